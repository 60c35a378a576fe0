"""Do the tasks of an image share its prefix at every image budget? Before and after a change, side by side.

    python -m benchmarks.sharing [--items N] [--before REF] [--after REF]

The pipeline (variant b of `benchmarks.run`, in its own child process) on the
same images at every job budget of `BUDGETS` with 1, 2 and 3 tasks per image
(`TASKS`), each run on the code of two commits (`git archive` snapshots:
`--before`, default the main branch before issue 24, and `--after`, default
HEAD). Configurations run interleaved (before, after for one cell, then the
next cell), so the shared machine's drifting load falls on both alike.

Figures per run: prefix reuse (cached / shareable tokens, as in
`benchmarks.measure.prefix_reuse`: every task but the first of an image),
prompt tokens computed per image (exact, independent of the load) and
tasks/s. Writes benchmarks/sharing.json and re-renders BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import pathlib
import subprocess
import sys
from typing import Any, Mapping, Optional, Sequence

from benchmarks import report
from benchmarks.incremental import baseline_tree
from benchmarks.measure import TaskRecord, from_records, load_average, machine
from benchmarks.run import run_child
from benchmarks.workload import Workload, checkpoint_parameters, make_images, prompt_suffix_tokens, task_specs

BUDGETS = (280, 560, 1120)
TASKS = (("ocr",), ("ocr", "caption"), ("ocr", "caption", "detect"))
# Short answers: the prefill (what sharing saves) dominates, and the 18 runs fit a shared 2-core box.
MAX_TOKENS: Mapping[str, int] = {"ocr": 64, "caption": 24, "detect": 48}
BEFORE = "2cd044e"  # main before issue 24: siblings admitted beside their leader, sparse sliding-window retention


def measure(raw: Mapping[str, Any], suffix_tokens: Mapping[str, int], tasks: int) -> dict[str, Any]:
    records = [TaskRecord(*r) for r in raw["records"]]
    result = from_records("b", raw["items"], records, suffix_tokens, wall_s=raw["wall_s"],
                          busy_s=raw.get("busy_s"), peak_rss_bytes=raw["peak_rss_bytes"], cpu_s=raw.get("cpu_s"))
    figures = result.figures()
    return {
        "prefix_reuse_ratio": figures["prefix_reuse_ratio"] if tasks > 1 else None,  # one task: nothing to share
        # The same against each prefix rounded down to whole cache blocks (hits come in blocks).
        "prefix_reuse_of_block_aligned": figures["prefix_reuse_of_block_aligned"] if tasks > 1 else None,
        "computed_prompt_tokens_per_image": round(figures["computed_prompt_tokens"] / raw["items"], 1),
        "tasks_per_s": figures["tasks_per_s"],
        "cpu_s_per_task": figures["cpu_s_per_task"],
        "items": raw["items"],
        "task_errors": raw.get("task_errors", 0),
    }


def _commit(ref: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", ref], cwd=report.REPO, check=True, capture_output=True,
                          text=True).stdout.strip()


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=3, help="images per run")
    parser.add_argument("--before", default=BEFORE, help="git ref of the code before the change")
    parser.add_argument("--after", default="HEAD", help="git ref of the code after the change")
    parser.add_argument("--profile", default="cpu-tiny")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/vision-batch-bench"))
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    from tiny_model.checkpoint import ensure_checkpoint

    load_at_start = load_average()
    checkpoint = str(ensure_checkpoint("bench"))
    images = make_images(args.workdir, args.items)
    trees = {"before": baseline_tree(args.workdir, args.before), "after": baseline_tree(args.workdir, args.after)}
    suffix_tokens = prompt_suffix_tokens(checkpoint, task_specs(MAX_TOKENS))
    started = datetime.datetime.now(datetime.timezone.utc)
    run_dir = args.workdir / started.strftime("sharing-%Y%m%dT%H%M%SZ")
    rows: list[dict[str, Any]] = []
    # The three-task cells first: a run cut short still says the most.
    for tasks in reversed(TASKS):
        for budget in BUDGETS:
            workload = Workload(images=images, model_path=checkpoint, model_id="bench", profile=args.profile,
                                max_tokens={task: MAX_TOKENS[task] for task in tasks}, vision_tokens=budget,
                                beam_options=("--tasks", ",".join(tasks)))
            for code, tree in trees.items():
                load = load_average()
                raw = run_child("pipeline", workload, run_dir / f"{budget}-{len(tasks)}-{code}", {}, tree=tree)
                row: dict[str, Any] = {"budget": budget, "tasks": len(tasks), "code": code, "load_1min": load}
                row.update({"error": raw["error"]} if "error" in raw else measure(raw, suffix_tokens, len(tasks)))
                logging.info("%s", row)
                rows.append(row)
                _write(args, load_at_start, checkpoint, started, rows)
    print(report.sharing_table(json.loads(report.RESULTS_FILES["sharing"].read_text())))
    return 1 if any("error" in row for row in rows) else 0


def _write(args: argparse.Namespace, load_at_start: float, checkpoint: str, started: datetime.datetime,
           rows: Sequence[Mapping[str, Any]]) -> None:
    """benchmarks/sharing.json with the runs so far, and BENCHMARKS.md re-rendered."""
    document = {
        "command": "python -m benchmarks.sharing " + " ".join(args.argv),
        "date": started.strftime("%Y-%m-%d"),
        "machine": machine(),
        "load_1min_at_start": load_at_start,
        "model": {"preset": "bench", "parameters": checkpoint_parameters(checkpoint)},
        "commits": {"before": _commit(args.before), "after": _commit(args.after)},
        "workload": {"items": args.items, "max_tokens": dict(MAX_TOKENS), "engine_profile": args.profile},
        "runs": list(rows),
    }
    report.RESULTS_FILES["sharing"].write_text(json.dumps(document, indent=2) + "\n")
    report.write_benchmarks_md()


if __name__ == "__main__":
    sys.exit(main())
