"""Sweep the engine profile's throughput knobs on the bench model, one knob at a time.

    python -m benchmarks.tune [--items N] [--knobs max_num_seqs,max_in_flight,...]

Engine knobs are measured on the raw engine (a), which has no pipeline in
the way; `max_in_flight` (the pipeline's back-pressure) on the pipeline (b).
Writes benchmarks/tuning.json (and re-renders BENCHMARKS.md); the reasons in engine/profiles.py
quote it. Same caveat as the main benchmark: the machine is shared, so only
differences well beyond the run-to-run noise (±10-20 %) mean anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import pathlib
import sys
from typing import Any, Optional, Sequence

from benchmarks import report
from benchmarks.measure import load_average, machine
from benchmarks.run import run_child, to_result
from benchmarks.workload import BENCH_MAX_TOKENS, Workload, make_images, prompt_suffix_tokens, task_specs
from configuration.options import parse_engine_args
from engine.profiles import MiB
# knob -> (variant it is measured on, values); each value is tried with every other knob at the profile's value.
SWEEPS: dict[str, tuple[str, list[Any]]] = {
    "kv_cache_memory_bytes": ("raw", [256 * MiB, 512 * MiB, 1024 * MiB]),
    "dtype": ("raw", ["bfloat16", "float32"]),
    "max_num_seqs": ("raw", [16, 32, 64, 128]),
    "max_num_batched_tokens": ("raw", [1024, 2048, 4096, 8192]),
    "disable_hybrid_kv_cache_manager": ("raw", [False, True]),
    "max_in_flight": ("pipeline", [24, 48, 96, 192]),
    "vision_tokens": ("pipeline", [140, 280]),
}
WORKLOAD_KNOBS = ("max_in_flight", "vision_tokens")  # pipeline options rather than engine arguments


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=30)
    parser.add_argument("--knobs", default=",".join(SWEEPS))
    parser.add_argument("--profile", default="cpu-tiny")
    parser.add_argument("--engine_arg", action="append", default=[], metavar="KEY=JSON", help="base override")
    parser.add_argument("--repeat", type=int, default=1, help="runs per value, interleaved (noise estimate)")
    parser.add_argument("--workdir", default="/tmp/vision-batch-bench")
    args = parser.parse_args(argv)

    from tiny_model.checkpoint import ensure_checkpoint

    workdir = pathlib.Path(args.workdir)
    checkpoint = str(ensure_checkpoint("bench"))
    base = parse_engine_args(args.engine_arg)
    workload = Workload(images=make_images(workdir, args.items), model_path=checkpoint, model_id="bench",
                        profile=args.profile, max_tokens=dict(BENCH_MAX_TOKENS), engine_args=base)
    suffix_tokens = prompt_suffix_tokens(checkpoint, task_specs(BENCH_MAX_TOKENS))
    started = datetime.datetime.now(datetime.timezone.utc)
    run_dir = workdir / started.strftime("tune-%Y%m%dT%H%M%SZ")
    rows = []
    for knob in args.knobs.split(","):
        variant, values = SWEEPS[knob]
        for repeat, value in ((r, v) for r in range(args.repeat) for v in values):
            if knob in WORKLOAD_KNOBS:
                trial = dataclasses.replace(workload, **{knob: value})
            else:
                trial = dataclasses.replace(workload, engine_args={**workload.engine_args, knob: value})
            load = load_average()
            raw = run_child(variant, trial, run_dir / f"{knob}-{value}-{repeat}", {})
            row: dict[str, Any] = {"knob": knob, "value": value, "variant": variant, "items": args.items, "load_1min": load}
            if "error" in raw:
                row["error"] = raw["error"]
            else:
                figures = to_result(variant, raw, suffix_tokens).figures()
                row.update({k: figures[k] for k in ("tasks_per_s", "cpu_s_per_task", "engine_busy_fraction", "prefix_reuse_ratio",
                                                    "computed_prompt_tokens", "peak_rss_mib", "wall_s")})
            logging.info("%s", row)
            rows.append(row)
    # Knobs swept now replace their earlier rows; other knobs' rows are kept (sweeps may run separately).
    path = report.RESULTS_FILES["tuning"]
    earlier = json.loads(path.read_text()) if path.exists() else {"sweeps": []}
    swept = set(args.knobs.split(","))
    sweeps = [sweep for sweep in earlier["sweeps"] if sweep["knob"] not in swept]
    command = "python -m benchmarks.tune " + " ".join(argv if argv is not None else sys.argv[1:])
    for knob in args.knobs.split(","):
        sweeps.append({"knob": knob, "date": started.strftime("%Y-%m-%d"), "command": command, "profile": args.profile,
                       "base_overrides": base, "rows": [row for row in rows if row["knob"] == knob]})
    path.write_text(json.dumps({"machine": machine(), "sweeps": sweeps}, indent=2) + "\n")
    report.write_benchmarks_md()
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
