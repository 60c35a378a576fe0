"""Incremental runs against a growing history: peak RSS and wall time at 0, 100 k, 1 M and 10 M earlier result rows.

    python -m benchmarks.incremental [--sizes 0,100000,1000000,10000000] [--items 40]
                                     [--designs join,side-input] [--baseline REF]

The same small input (generated images, tiny model, tiny outputs) runs with
`--incremental_from` pointing at synthetic histories of each size
(`benchmarks/history.py`: real result rows of this input, replicated under
fresh hashes, written as the sink writes them, with planted answers for a
quarter of the items in full and a quarter in part). Every run is its own
`python -m pipelines.vision_batch` process; its peak RSS is that process's
`ru_maxrss` (os.wait4), so the engine, Beam and the history scan are all in it.

Designs: `join` is this tree; `side-input` is the design it replaced (every
earlier key as a side input), run from a git snapshot of `--baseline`. Each
run's skipped counts are checked against the planted rows: a run that skips
anything else is an error, whatever its memory.

Writes benchmarks/incremental.json and its section of BENCHMARKS.md. The
machine is shared: peak RSS is what this measures; wall times are reported
with the load average beside them and are noisy.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import Any, Mapping, Optional, Sequence

import pyarrow.parquet as pq

from benchmarks import history, report
from benchmarks.measure import load_average, machine
from benchmarks.workload import STREAMING_KV_BYTES, STREAMING_MAX_TOKENS, cached_directory, make_images
from schemas.tables import RESULTS_SCHEMA

_LOG = logging.getLogger("benchmarks.incremental")

# The last commit with the side-input design (transforms/incremental.py's ReadDoneKeys + SelectTasks).
SIDE_INPUT_COMMIT = "fe068fd01cdeeb3d0516752cc42f80da02eab093"
RSS_TARGET = 1.2  # peak RSS at the largest history over the run without history (issue 15)
MODEL_ID = "bench-incremental"  # fixed, so history rows and every design's run share it
RUN_TIMEOUT_S = 3 * 3600


def baseline_tree(workdir: pathlib.Path, ref: str) -> pathlib.Path:
    """A snapshot of `ref` (git archive), to run the replaced design's own code."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=report.REPO, check=True, capture_output=True, text=True).stdout.strip()

    def build(staging: pathlib.Path) -> None:
        archive = subprocess.run(["git", "archive", commit], cwd=report.REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(staging)], input=archive, check=True)

    return cached_directory(workdir / f"tree-{commit[:12]}", build)


def pipeline_command(images: pathlib.Path, output: pathlib.Path, history_dir: Optional[pathlib.Path]) -> list[str]:
    command = [
        sys.executable, "-m", "pipelines.vision_batch", "--input", f"{images}/img_*", "--output", str(output),
        "--model_id", MODEL_ID, "--progress_interval_s", "0",
        # The streaming check's KV pool: touched in full by a few hundred images, so it is not
        # what differs between runs.
        "--engine_arg", f"kv_cache_memory_bytes={STREAMING_KV_BYTES}",
    ]
    for task, limit in STREAMING_MAX_TOKENS.items():
        command += ["--max_tokens", f"{task}={limit}"]
    if history_dir is not None:
        command += ["--incremental_from", f"{history_dir}/*"]
    return command


def measured_run(command: Sequence[str], tree: pathlib.Path, log_path: pathlib.Path) -> dict[str, Any]:
    """Run one pipeline process; its exit code, wall time, CPU time and peak RSS (ru_maxrss from os.wait4)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    load = load_average()
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        timer = threading.Timer(RUN_TIMEOUT_S, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "exit_code": process.returncode,
        "wall_s": round(time.monotonic() - started, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "load_1min_before": load,
    }


def checked(result: dict[str, Any], output: pathlib.Path, expected: Mapping[str, int]) -> dict[str, Any]:
    """Add the run's counts from its run_summary.json and whether they are the expected ones."""
    summary_path = output / "run_summary.json"
    if result["exit_code"] != 0 or not summary_path.exists():
        return {**result, "error": f"exit {result['exit_code']}, no run summary"}
    summary = json.loads(summary_path.read_text())
    counts = summary["counts"]
    got = {key: counts[key] for key in expected}
    result.update(got)
    result["run_wall_s"] = summary["wall_time_s"]
    result["history_candidates"] = counts.get("history_candidates")
    result["balanced"] = summary["accounting"]["balanced"]
    if got != dict(expected) or not result["balanced"]:
        result["error"] = f"counts {got}, expected {dict(expected)}, balanced {result['balanced']}"
    return result


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,100000,1000000,10000000", help="history sizes in result rows")
    parser.add_argument("--items", type=int, default=40, help="current input: generated images (x3 tasks)")
    parser.add_argument("--designs", default="join,side-input", help="join (this tree), side-input (--baseline)")
    parser.add_argument("--baseline", default=SIDE_INPUT_COMMIT, help="git ref of the side-input design")
    parser.add_argument("--side_input_max_rows", type=int, default=10_000_000,
                        help="largest history the side-input design is run against")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/vision-batch-bench/incremental"))
    parser.add_argument("--no_write", action="store_true", help="print only")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    command_line = "python -m benchmarks.incremental " + " ".join(argv if argv is not None else sys.argv[1:])
    sizes = [int(size) for size in args.sizes.split(",")]
    designs = [design for design in args.designs.split(",") if design]
    started = datetime.datetime.now(datetime.timezone.utc)
    run_dir = args.workdir / started.strftime("run-%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True)
    images = make_images(args.workdir, args.items, seed=7, max_side=256)
    trees = {"join": report.REPO}
    if "side-input" in designs:
        trees["side-input"] = baseline_tree(args.workdir, args.baseline)

    # The run without history: the reference for the RSS goal, and the real rows the history replicates.
    _LOG.info("run without history")
    plain = measured_run(pipeline_command(images, run_dir / "plain", None), report.REPO, run_dir / "plain.log")
    plain = checked(plain, run_dir / "plain", {"skipped_items": 0, "skipped_tasks": 0})
    if "error" in plain:
        raise SystemExit(f"the run without history failed ({plain['error']}); see {run_dir / 'plain.log'}")
    template = pq.read_table(run_dir / "plain" / "results", schema=RESULTS_SCHEMA)
    plan = history.Plan.of(template)
    expected = {"skipped_items": plan.expected_skipped_items, "skipped_tasks": plan.expected_skipped_tasks}
    _LOG.info("plain: %s; planted: %d full, %d partial, %d foreign items", plain, len(plan.full), len(plan.partial), len(plan.foreign))

    runs: list[dict[str, Any]] = []
    errors: list[str] = []
    for size in sizes:
        generated = time.monotonic()
        history_dir = history.write_history(args.workdir, size, template, plan)
        rows = history.history_rows(history_dir)
        _LOG.info("history of %d rows at %s (%.0f s)", rows, history_dir, time.monotonic() - generated)
        for design in designs:
            if design == "side-input" and size > args.side_input_max_rows:
                continue
            output = run_dir / f"{design}-{size}"
            _LOG.info("%s design, history %d rows", design, rows)
            result = measured_run(pipeline_command(images, output, history_dir), trees[design], run_dir / f"{design}-{size}.log")
            result = checked(result, output, expected if rows else {"skipped_items": 0, "skipped_tasks": 0})
            result.update({"design": design, "history_rows": rows, "rss_over_no_history": round(result["peak_rss_mib"] / plain["peak_rss_mib"], 3)})
            _LOG.info("%s", result)
            runs.append(result)
            if "error" in result:
                errors.append(f"{design} at {rows} rows: {result['error']}")

    finished = datetime.datetime.now(datetime.timezone.utc)
    largest = max((r for r in runs if r["design"] == "join" and "error" not in r), key=lambda r: r["history_rows"], default=None)
    document = {
        "date": started.strftime("%Y-%m-%d"),
        "started_utc": started.isoformat(timespec="seconds"),
        "duration_s": round((finished - started).total_seconds()),
        "command": command_line,
        "machine": {**machine(), "load_1min_at_start": plain["load_1min_before"]},
        "input": {"items": args.items, "tasks": list(plan.tasks), "max_tokens": dict(STREAMING_MAX_TOKENS),
                  "kv_cache_memory_bytes": STREAMING_KV_BYTES, "model": "tiny-dense", "template_rows": template.num_rows},
        "history": {"night_rows": history.NIGHT_ROWS, "file_rows": history.FILE_ROWS,
                    "row_group_rows": history.rows_per_group(template),
                    "planted_items": {"full": len(plan.full), "partial": len(plan.partial), "foreign": len(plan.foreign)}},
        "baseline_commit": args.baseline if "side-input" in designs else None,
        "expected": expected,
        "no_history": plain,
        "runs": runs,
        "target": {  # peak RSS of the join design at its largest history over the run without history
            "history_rows": largest["history_rows"] if largest else None,
            "goal": RSS_TARGET,
            "measured": largest["rss_over_no_history"] if largest else None,
            "met": (largest["rss_over_no_history"] <= RSS_TARGET) if largest else None,
        },
        "errors": errors,
    }
    print(json.dumps(document, indent=2))
    if not args.no_write:
        report.RESULTS_FILES["incremental"].write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        report.write_benchmarks_md()
        _LOG.info("wrote %s and BENCHMARKS.md", report.RESULTS_FILES["incremental"])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
