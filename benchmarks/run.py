"""Run every design side by side on the same inputs and write BENCHMARKS.md + benchmarks/results.json.

    python -m benchmarks.run [--items N] [--host_items N] [--quick] [--only a,b,...,hb2,host,rss] [--wait_quiet LOAD]

Each variant runs in its own child process (`benchmarks.variants`), one after
the other, on the same generated images, prompts and engine arguments: the
engine-bound variants (a..e2) on the bench model, the host-bound ones (ha..hb0)
on a tiny model whose engine step costs less than the host's work per request,
as on an accelerator. Then the host-side stages alone (host), the decode step
cost (steps) and the streaming check (rss) on the tiny model at two input sizes.
Compare figures only within one run: the machine is shared.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from benchmarks import report
from benchmarks.measure import TaskRecord, VariantResult, from_records, load_average, machine
from benchmarks.workload import (
    BENCH_MAX_TOKENS,
    HOST_ENVIRONMENT,
    HOST_OTHER_PROCESSORS,
    HOST_PAGE_IMAGES,
    HOST_PAGE_SIDE,
    HOST_PRESET,
    HOST_VISION_TOKENS,
    STREAMING_KV_BYTES,
    STREAMING_MAX_TOKENS,
    STREAMING_PRESET,
    Workload,
    checkpoint_parameters,
    make_images,
    prompt_suffix_tokens,
    task_specs,
)
from configuration.options import parse_engine_args

_LOG = logging.getLogger("benchmarks")


@dataclasses.dataclass(frozen=True)
class Variant:
    key: str  # row label: a, b, c, d, e1, ...
    name: str  # entry in benchmarks.variants.VARIANTS
    title: str
    engine_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of the profile
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # keyword arguments of the variant
    workload: str = "bench"  # "bench": the engine-bound bench model; "host": the host-bound tiny model


# The accelerator profiles' host-side placement (engine/profiles.py), with the engine core
# in this process or in its own.
_IN_PROCESS = {"preprocess_on_step_thread": False, "engine_core_process": False}
_CORE_PROCESS = {"preprocess_on_step_thread": False, "engine_core_process": True}


VARIANTS: tuple[Variant, ...] = (
    Variant("a", "raw", "raw engine ceiling: one LLM.generate, images pre-decoded"),
    Variant("b", "pipeline", "this pipeline, files -> Parquet (vision_batch.run)"),
    Variant("c", "runinference", "RunInference + BatchElements, llm.generate(batch) per batch"),
    Variant("d", "server", "vllm serve + OpenAI client, base64 images (VLLM_CPU_NUM_OF_RESERVED_CPU=0)",
            options={"reserved_cpus": 0}),
    Variant("d1", "server", "vllm serve as shipped: vLLM's default reserves 1 of the 2 cores for the API process",
            options={"reserved_cpus": None}),
    Variant("e1", "pipeline", "ablation: pipeline, prefix caching off", engine_args={"enable_prefix_caching": False}),
    Variant("e2", "pipeline", "ablation: pipeline, task text before the image", options={"settings": {"image_first": False}}),
    Variant("ha", "raw", "raw engine ceiling: one LLM.generate, images pre-decoded", workload="host"),
    Variant("hb", "pipeline", "this pipeline, engine core in-process, images preprocessed on Beam's thread",
            workload="host", options={"settings": _IN_PROCESS}),
    Variant("hb2", "pipeline", "this pipeline, vLLM's engine core in its own process (V1 multiprocessing)",
            workload="host", options={"settings": _CORE_PROCESS}),
    Variant("hb0", "pipeline", "(hb) with each task preprocessing its image again (no processed-image cache)",
            workload="host", engine_args={"mm_processor_cache_gb": 0}, options={"settings": _IN_PROCESS}),
    # The host-feed design (engine/host.py): Beam worker processes feeding one shared engine core.
    Variant("hf1", "feeders", "this pipeline, 1 Beam worker process feeding the host's shared engine core",
            workload="host", options={"feeders": 1}),
    Variant("hf2", "feeders", "this pipeline, 2 Beam worker processes feeding one shared engine core",
            workload="host", options={"feeders": 2}),
)


def run_child(variant: str, workload: Workload, out_dir: pathlib.Path, options: dict[str, Any],
              environment: Optional[dict[str, str]] = None, tree: pathlib.Path = report.REPO) -> dict[str, Any]:
    """Run one variant in a fresh process (with `environment` added to ours) on the code of `tree` (default: this
    repository; another commit's snapshot compares before and after); its JSON result, or {"error": ...}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"workload": {**dataclasses.asdict(workload), "images": str(workload.images)}, "out_dir": str(out_dir),
            "options": options}
    (out_dir / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "benchmarks.variants", variant, str(out_dir / "spec.json"), str(out_dir / "result.json")]
    started = time.monotonic()
    with open(out_dir / "log.txt", "w") as log:
        code = subprocess.run(command, cwd=tree, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(tree), **(environment or {})}).returncode
    _LOG.info("%s finished in %.0f s (exit %d)", variant, time.monotonic() - started, code)
    if code != 0:
        return {"error": f"exit {code}; see {out_dir / 'log.txt'}"}
    return json.loads((out_dir / "result.json").read_text())


def to_result(key: str, raw: dict[str, Any], suffix_tokens: Optional[dict[str, int]]) -> VariantResult:
    records = [TaskRecord(*r) for r in raw["records"]]
    result = from_records(
        key, raw["items"], records, suffix_tokens,
        wall_s=raw["wall_s"], busy_s=raw.get("busy_s"), peak_rss_bytes=raw["peak_rss_bytes"], cpu_s=raw.get("cpu_s"),
        notes={**raw.get("notes", {}), "task_errors": raw.get("task_errors", 0)},
    )
    result.tasks += raw.get("task_errors", 0)  # answered, but the answer failed validation (error rows)
    return result


def median_run(found: Sequence[VariantResult]) -> VariantResult:
    """The median run by tasks/s (the lower middle one of an even count), noting every run's tasks/s."""
    ordered = sorted(found, key=lambda result: result.figures()["tasks_per_s"])
    median = ordered[(len(ordered) - 1) // 2]
    median.notes["tasks_per_s_runs"] = [result.figures()["tasks_per_s"] for result in found]
    return median


def wait_quiet(threshold: float, poll_s: float = 30, limit_s: float = 20 * 60) -> float:
    """Wait until the 1-minute load average is below `threshold` (at most `limit_s`); the load when starting."""
    deadline = time.monotonic() + limit_s
    while load_average() >= threshold and time.monotonic() < deadline:
        _LOG.info("load %.2f >= %.2f; waiting", load_average(), threshold)
        time.sleep(poll_s)
    return load_average()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 200 images x 3 tasks ("a few hundred" tasks per variant, 600 requests) keeps the whole command
    # near 45 minutes on a 2-core box: ~1.1 s of the bench model per image in each of seven variants
    # (the one-core server twice that), plus the step-cost and streaming checks.
    parser.add_argument("--items", type=int, default=200, help="images (x3 tasks) per variant")
    # The host-bound variants run ~10x faster per image than the bench model's.
    parser.add_argument("--host_items", type=int, default=400, help="images (x3 tasks) per host-bound variant")
    parser.add_argument("--quick", action="store_true", help="60 items, streaming check at 200/1000: for iterating")
    parser.add_argument("--only", default="",
                        help="comma-separated variant keys (a,b,c,d,d1,e1,e2,ha,hb,hb2,hb0,hf1,hf2,host,steps,rss) to run")
    parser.add_argument("--profile", default="cpu-tiny", help="engine profile for every variant")
    parser.add_argument("--engine_arg", action="append", default=[], metavar="KEY=JSON", help="override for every variant")
    parser.add_argument("--max_in_flight", type=int, default=None)
    parser.add_argument("--streaming_items", default="1000,5000", help="pipeline input sizes of the RSS check")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/vision-batch-bench"))
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the chosen variants this many rounds, interleaved; each row is the median run")
    parser.add_argument("--wait_quiet", type=float, default=0.0, metavar="LOAD",
                        help="first wait (up to 20 min) for the 1-minute load average to drop below LOAD")
    parser.add_argument("--no_write", action="store_true", help="print the table only (sweeps, experiments)")
    args = parser.parse_args(argv)
    if args.only and not args.no_write:
        # results.json holds one whole run (the planner reads its pipeline efficiency): a partial
        # run written over it lost every figure it did not re-measure.
        parser.error("--only measures a subset: add --no_write (results.json and BENCHMARKS.md keep one whole run)")
    if args.quick:
        args.items = 60 if args.items == 200 else args.items
        args.host_items = 120 if args.host_items == 400 else args.host_items
        args.streaming_items = "200,1000" if args.streaming_items == "1000,5000" else args.streaming_items
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    only = set(filter(None, args.only.split(",")))
    load_at_start = wait_quiet(args.wait_quiet) if args.wait_quiet else load_average()
    started = datetime.datetime.now(datetime.timezone.utc)
    run_dir = args.workdir / started.strftime("run-%Y%m%dT%H%M%SZ")

    from tiny_model.checkpoint import ensure_checkpoint

    checkpoint = str(ensure_checkpoint("bench"))
    overrides = parse_engine_args(args.engine_arg)
    workload = Workload(
        images=make_images(args.workdir, args.items), model_path=checkpoint, model_id="bench", profile=args.profile,
        max_tokens=dict(BENCH_MAX_TOKENS), engine_args=overrides, max_in_flight=args.max_in_flight,
    )
    host_checkpoint = str(ensure_checkpoint(HOST_PRESET))
    host_workload = Workload(
        images=make_images(args.workdir, args.host_items), model_path=host_checkpoint, model_id=HOST_PRESET,
        profile=args.profile, max_tokens=dict(BENCH_MAX_TOKENS), engine_args=overrides, max_in_flight=args.max_in_flight,
        vision_tokens=HOST_VISION_TOKENS,
    )
    workloads = {"bench": workload, "host": host_workload}
    suffix_tokens = {name: prompt_suffix_tokens(w.model_path, task_specs(BENCH_MAX_TOKENS))
                     for name, w in workloads.items()}

    runs: dict[str, list[VariantResult]] = {}
    errors: dict[str, str] = {}
    loads: dict[str, float] = {}
    for round_ in range(args.repeat):  # rounds interleave the variants: a, b, ..., a, b, ...
        for variant in VARIANTS:
            if only and variant.key not in only:
                continue
            _LOG.info("variant %s (%s), round %d: %s", variant.key, variant.name, round_ + 1, variant.title)
            loads.setdefault(variant.key, load_average())
            base = workloads[variant.workload]
            variant_workload = dataclasses.replace(base, engine_args={**base.engine_args, **variant.engine_args})
            raw = run_child(variant.name, variant_workload, run_dir / f"{variant.key}-{round_ + 1}", variant.options,
                            HOST_ENVIRONMENT if variant.workload == "host" else None)
            if "error" in raw:
                errors[variant.key] = raw["error"]
                continue
            runs.setdefault(variant.key, []).append(to_result(variant.key, raw, suffix_tokens[variant.workload]))
            _LOG.info("%s: %s", variant.key, runs[variant.key][-1].figures())
    results = {key: median_run(found) for key, found in runs.items()}

    host_stages: list[dict[str, Any]] = []
    if not only or "host" in only:
        pages = make_images(args.workdir, HOST_PAGE_IMAGES, seed=2, max_side=HOST_PAGE_SIDE)
        others = {name: str(ensure_checkpoint(name)) for name in HOST_OTHER_PROCESSORS}
        raw = run_child("host-stages", host_workload, run_dir / "host-stages",
                        {"page_images": str(pages), "other_models": others}, HOST_ENVIRONMENT)
        if "error" in raw:
            errors["host-stages"] = raw["error"]
        else:
            host_stages = raw["host_stages"]
            _LOG.info("host stages: %s", host_stages)

    step_cost: list[dict[str, Any]] = []
    if not only or "steps" in only:
        raw = run_child("step-cost", workload, run_dir / "step-cost", {})
        if "error" in raw:
            errors["step-cost"] = raw["error"]
        else:
            step_cost = raw["step_cost"]
            _LOG.info("decode step cost: %s", step_cost)

    streaming: dict[int, dict[str, Any]] = {}
    if not only or "rss" in only:
        # The KV pool is allocated up front but its pages are touched lazily, and vLLM's free-block
        # queue hands out every block of the pool before reusing one: RSS grows with tokens served
        # until the whole pool has been touched (bounded by kv_cache_memory_bytes, not per item).
        # The profile's 512 MiB is 1.4 M tokens of the tiny model, about what 5,000 items use, so the
        # check sizes the pool (32 MiB, 87 k tokens) to be fully touched within the first few hundred
        # items: both runs then compare the pipeline's own memory in steady state.
        tiny = Workload(images=args.workdir, model_path=str(ensure_checkpoint(STREAMING_PRESET)), model_id=STREAMING_PRESET,
                        profile=args.profile, max_tokens=dict(STREAMING_MAX_TOKENS),
                        engine_args={**overrides, "kv_cache_memory_bytes": STREAMING_KV_BYTES})
        for count in (int(n) for n in args.streaming_items.split(",")):
            images = make_images(args.workdir, count, seed=1, max_side=256)
            raw = run_child("pipeline", dataclasses.replace(tiny, images=images), run_dir / f"rss-{count}", {})
            if "error" in raw:
                errors[f"rss-{count}"] = raw["error"]
                continue
            streaming[count] = {"items": raw["items"], "wall_s": round(raw["wall_s"], 1),
                                "peak_rss_mib": round(raw["peak_rss_bytes"] / 2**20, 1)}
            _LOG.info("streaming %d: %s", count, streaming[count])

    finished = datetime.datetime.now(datetime.timezone.utc)
    document = report.results_document(
        command=command, started=started, finished=finished, machine=machine(), load_at_start=load_at_start,
        loads=loads, workloads=workloads, parameters=checkpoint_parameters(checkpoint), variants=VARIANTS,
        results=results, step_cost=step_cost, streaming=streaming, errors=errors, suffix_tokens=suffix_tokens,
        host_stages=host_stages, host_parameters=checkpoint_parameters(host_checkpoint),
    )
    print(report.table(document))
    print(report.table(document, "host", report.HOST_COLUMNS))
    print(report.host_stages_table(document["host_stages"]))
    if not args.no_write:
        report.RESULTS_FILES["throughput"].write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        report.write_benchmarks_md()
        _LOG.info("wrote BENCHMARKS.md and benchmarks/results.json")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
