"""What per-task image budgets cost: prefix reuse and throughput against one budget for every task.

    python -m benchmarks.budgets [--items N] [--repeat R] [--wait_quiet LOAD]

The pipeline (variant b of `benchmarks.run`, in its own child process) on the
same images, with the tasks' image budgets set four ways:

- one-280: every task at 280 soft tokens: one prefix group per image (the default);
- one-560: every task at 560: one group, every task at the largest budget;
- two-groups: ocr 560; caption and detect 280;
- three-groups: ocr 560, caption 140, detect 280.

Tasks of one image with the same budget share its prefix; each other budget
computes the image again (another prefix group). The figures say what that
costs against running everything at one budget. Repeats are interleaved
(ABCD ABCD) so the shared machine's drifting load falls on every
configuration alike; compare configurations within one repeat. Writes
benchmarks/budgets.json and re-renders BENCHMARKS.md from every stored result.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import pathlib
import statistics
import sys
from typing import Any, Mapping, Optional, Sequence

from benchmarks import report
from benchmarks.measure import TaskRecord, from_records, load_average, machine
from benchmarks.run import run_child, wait_quiet
from benchmarks.workload import BENCH_MAX_TOKENS, Workload, checkpoint_parameters, make_images, prompt_suffix_tokens, task_specs

# configuration -> per-task budgets (tasks without one: the job's, 280, the bench model's default)
CONFIGURATIONS: Mapping[str, Mapping[str, int]] = {
    "one-280": {},
    "one-560": {"ocr": 560, "caption": 560, "detect": 560},
    "two-groups": {"ocr": 560},
    "three-groups": {"ocr": 560, "caption": 140},
}
JOB_BUDGET = 280
_FIGURES = ("tasks_per_s", "cpu_s_per_task", "prefix_reuse_ratio", "computed_prompt_tokens", "cached_tokens", "wall_s")


def grouped(records: Sequence[TaskRecord], budgets: Mapping[str, int]) -> list[TaskRecord]:
    """Records keyed by (image, budget): a prefix group is what its tasks can share."""
    return [dataclasses.replace(r, image=f"{r.image}@{budgets.get(r.task, JOB_BUDGET)}") for r in records]


def measure(raw: Mapping[str, Any], budgets: Mapping[str, int], suffix_tokens: Mapping[str, int]) -> dict[str, Any]:
    records = grouped([TaskRecord(*r) for r in raw["records"]], budgets)
    result = from_records("b", raw["items"], records, suffix_tokens, wall_s=raw["wall_s"],
                          busy_s=raw.get("busy_s"), peak_rss_bytes=raw["peak_rss_bytes"], cpu_s=raw.get("cpu_s"))
    figures = result.figures()
    if result.reuse is not None and not result.reuse.shareable_tokens:
        figures["prefix_reuse_ratio"] = None  # no group of two or more tasks: nothing to share
    groups = len({r.image for r in records})
    return {**{key: figures[key] for key in _FIGURES}, "items": raw["items"], "prefix_groups_per_image": round(groups / raw["items"], 2),
            "computed_prompt_tokens_per_image": round(figures["computed_prompt_tokens"] / raw["items"], 1),
            "task_errors": raw.get("task_errors", 0)}


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: medians over repeats, and tasks/s relative to one-280 within each repeat.

    CPU seconds per task (of the pipeline's process tree) move less with the
    machine's load than wall-clock throughput does.
    """
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if "error" not in row:
            by_name.setdefault(row["configuration"], []).append(row)
    baseline = {row["repeat"]: row["tasks_per_s"] for row in by_name.get("one-280", ())}
    summary = {}
    for name, runs in by_name.items():
        relative = [row["tasks_per_s"] / baseline[row["repeat"]] for row in runs if baseline.get(row["repeat"])]
        summary[name] = {
            **{key: _median([row[key] for row in runs]) for key in
               ("tasks_per_s", "cpu_s_per_task", "prefix_reuse_ratio", "computed_prompt_tokens_per_image",
                "prefix_groups_per_image")},
            "tasks_per_s_vs_one_280": [round(value, 3) for value in relative],
            "repeats": len(runs),
        }
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=40, help="images (x3 tasks) per configuration and repeat")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved repeats of every configuration")
    parser.add_argument("--profile", default="cpu-tiny")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/vision-batch-bench"))
    parser.add_argument("--wait_quiet", type=float, default=0.0, metavar="LOAD",
                        help="first wait (up to 20 min) for the 1-minute load average to drop below LOAD")
    args = parser.parse_args(argv)
    from tiny_model.checkpoint import ensure_checkpoint

    load_at_start = wait_quiet(args.wait_quiet) if args.wait_quiet else load_average()
    checkpoint = str(ensure_checkpoint("bench"))
    workload = Workload(images=make_images(args.workdir, args.items), model_path=checkpoint, model_id="bench",
                        profile=args.profile, max_tokens=dict(BENCH_MAX_TOKENS), vision_tokens=JOB_BUDGET)
    suffix_tokens = prompt_suffix_tokens(checkpoint, task_specs(BENCH_MAX_TOKENS))
    started = datetime.datetime.now(datetime.timezone.utc)
    run_dir = args.workdir / started.strftime("budgets-%Y%m%dT%H%M%SZ")
    rows = []
    for repeat in range(args.repeat):
        for name, budgets in CONFIGURATIONS.items():
            load = load_average()
            raw = run_child("pipeline", dataclasses.replace(workload, task_vision_tokens=dict(budgets)),
                            run_dir / f"{name}-{repeat}", {})
            row: dict[str, Any] = {"configuration": name, "repeat": repeat, "load_1min": load}
            row.update({"error": raw["error"]} if "error" in raw else measure(raw, budgets, suffix_tokens))
            logging.info("%s", row)
            rows.append(row)
    document = {
        "command": "python -m benchmarks.budgets " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": started.strftime("%Y-%m-%d"),
        "machine": machine(),
        "load_1min_at_start": load_at_start,
        "model": {"preset": "bench", "parameters": checkpoint_parameters(checkpoint)},
        "workload": {"items": args.items, "max_tokens": dict(BENCH_MAX_TOKENS), "engine_profile": args.profile,
                     "job_vision_tokens": JOB_BUDGET},
        "configurations": {name: dict(budgets) for name, budgets in CONFIGURATIONS.items()},
        "runs": rows,
        "summary": summarise(rows),
    }
    report.RESULTS_FILES["budgets"].write_text(json.dumps(document, indent=2) + "\n")
    report.write_benchmarks_md()
    print(report.budgets_table(document))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
