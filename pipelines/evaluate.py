"""Score one or more results locations against a reference set (docs/evaluation.md).

    python -m pipelines.evaluate --results out/v1 [--results out/v2 ...] --references refs.parquet \
        [--report eval.md] [--json eval.json] [--match item_id|name] [--ignore_labels]

Prints the scores side by side (differences against the first run) and
writes the full report with the worst items and per-item changes.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from evaluation.report import describe_references, render_json, render_markdown, summary_table
from evaluation.runs import MATCH_MODES, load_run
from evaluation.scoring import RunScores, keyed_references, score_run
from evaluation.storage import read_references, write_text
from library import storage
from schemas.references import ReferenceItem


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--results", action="append", required=True,
                        help="a run's output location (OUT, reads OUT/results/*.parquet) or a Parquet glob; "
                             "local or gs://; repeat to compare runs (differences are against the first)")
    parser.add_argument("--label", action="append", default=[],
                        help="column name for each --results, in order (default: the location's last path part)")
    parser.add_argument("--references", required=True, help="reference set: Parquet or JSON Lines file or glob")
    parser.add_argument("--report", help="write the Markdown report here (local or gs://)")
    parser.add_argument("--json", dest="json_path", help="write every overall and per-item score as JSON here")
    parser.add_argument("--match", choices=MATCH_MODES, default="item_id",
                        help="join references and results on the full item_id, or on the file name "
                             "(+page/member) when they were made from copies at different paths")
    parser.add_argument("--ignore_labels", action="store_true",
                        help="class-agnostic detection AP: any predicted label may match any reference box")
    parser.add_argument("--worst", type=int, default=10, help="worst items listed per task and run")
    args = parser.parse_args(argv)
    if len(args.label) > len(args.results):
        parser.error("more --label than --results")
    return args


def score_all(args: argparse.Namespace, references: Sequence[ReferenceItem]) -> list[RunScores]:
    keyed = keyed_references(references, args.match)
    labels = args.label + [None] * (len(args.results) - len(args.label))
    scores = [
        score_run(load_run(location, args.match, label), keyed, match_labels=not args.ignore_labels)
        for location, label in zip(args.results, labels)
    ]
    names = [s.run.label for s in scores]
    if len(set(names)) < len(names):
        raise ValueError(f"runs share a column name ({', '.join(names)}): name them with --label")
    return scores


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Beam's GCS client with the default retry budget: an outage is one StorageFailure line, as in a run.
    storage.install()
    args = parse_args(argv)
    try:
        references = read_references(args.references)
        scores = score_all(args, references)
    except (FileNotFoundError, ValueError) as exc:  # wrong paths or keys: say which, without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = render_markdown(scores, describe_references(args.references, references), worst=args.worst)
    print("\n".join(summary_table(scores)))
    if args.report:
        write_text(args.report, report)
        print(f"report: {args.report}")
    if args.json_path:
        write_text(args.json_path, json.dumps(render_json(scores, args.references), indent=1) + "\n")
        print(f"scores: {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
