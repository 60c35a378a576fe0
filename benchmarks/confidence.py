"""What asking for the sampled tokens' log-probabilities (the `confidence` column) costs in throughput.

    python -m benchmarks.confidence [--items 24] [--rounds 3] [--workdir /tmp/vision-batch-bench]

One `vllm.LLM` with the pipeline's engine arguments for the bench model (as
variant (a), benchmarks/variants.py), the same decoded images and prompts,
generated with the pipeline's own SamplingParams (engine.local.sampling_params)
once with `logprobs=0` (EngineSettings.logprobs, the default) and once without,
alternated over rounds (the order flips each round), so both see the same
machine load. Prefix caching is off for this measurement: a repeated prompt
would otherwise come from the cache on its second run. Greedy decoding gives
both the same tokens. The figure (tasks/s with over without, per round and
median) goes to BENCHMARKS.md ("Confidence").
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
from typing import Any

from benchmarks.measure import load_average, machine, timed
from benchmarks.variants import load_llm, prompt_texts
from benchmarks.workload import BENCH_MAX_TOKENS, Workload, decode_files, image_files, make_images
from engine.local import engine_prompt, sampling_params
from library.metadata import ItemValues
from transforms.run_tasks import image_key


def measure(workload: Workload, rounds: int) -> dict[str, Any]:
    with_logprobs = workload.engine_settings()
    assert with_logprobs.logprobs, "the pipeline's default asks for log-probabilities"
    without = dataclasses.replace(with_logprobs, logprobs=False)
    specs = workload.specs()
    items = decode_files(image_files(workload.images))
    llm = load_llm(with_logprobs)
    texts = prompt_texts(llm, specs)
    prompts, requests = [], []
    for item in items:
        for spec in specs:
            request = spec.request(ItemValues(None))
            prompts.append(engine_prompt(texts[spec.name], item.image, image_key(item), request.vision_tokens))
            requests.append(request)
    params = {
        "with": [sampling_params(request, with_logprobs) for request in requests],
        "without": [sampling_params(request, without) for request in requests],
    }
    llm.generate(prompts[:3], params["with"][:3], use_tqdm=False)  # warm-up: first-call compilation, allocations
    runs: dict[str, list[dict[str, Any]]] = {"with": [], "without": []}
    for number in range(rounds):
        for name in (("with", "without") if number % 2 == 0 else ("without", "with")):
            outputs, window = timed(lambda: llm.generate(prompts, params[name], use_tqdm=False))
            generated = sum(len(output.outputs[0].token_ids) for output in outputs)
            scored = sum(output.outputs[0].cumulative_logprob is not None for output in outputs)
            runs[name].append({"wall_s": round(window.wall_s, 2), "tasks_per_s": round(len(prompts) / window.wall_s, 3),
                               "generated_tokens": generated, "scored_answers": scored})
    ratios = [w["tasks_per_s"] / wo["tasks_per_s"] for w, wo in zip(runs["with"], runs["without"])]
    return {
        "requests": len(prompts),
        "items": len(items),
        "rounds": runs,
        "ratio_per_round": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default="cpu-tiny")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/vision-batch-bench"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/confidence.json"))
    args = parser.parse_args()
    from tiny_model.checkpoint import ensure_checkpoint

    workload = Workload(
        images=make_images(args.workdir, args.items), model_path=str(ensure_checkpoint("bench")), model_id="bench",
        profile=args.profile, max_tokens=dict(BENCH_MAX_TOKENS), engine_args={"enable_prefix_caching": False},
    )
    load = load_average()
    result = {"load_average_at_start": load, "machine": machine(), **measure(workload, args.rounds)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
