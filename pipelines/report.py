"""Render a self-contained HTML report of a run's output location.

    python -m pipelines.report OUT --html report.html [--sample 24] [--order item_id|errors_first|spread]

OUT is what `--output` was (local or gs://): summary counts (from
OUT/run_summary.json, or computed from the tables without one), the error
breakdown, and a sample of items with the image re-read from its source,
detection boxes drawn, OCR text and caption side by side. The page is one
file (images inline, no scripts, no external resources).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Mapping, Optional, Sequence

from evaluation.storage import write_text
from library import storage
from library.formats import DecodeLimits
from library.shards import ShardSettings
from reporting.html import render
from reporting.images import THUMBNAIL_SIDE, load_images
from reporting.run import SAMPLE_ORDERS, load_run
from schemas.records import ItemRef


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="the run's output location (its --output): local directory or gs:// prefix")
    parser.add_argument("--html", required=True, help="where to write the page (local path or gs:// URI)")
    parser.add_argument("--sample", type=int, default=24, help="items shown with their image and answers (default 24)")
    parser.add_argument("--order", choices=SAMPLE_ORDERS, default="item_id",
                        help="which items: the first by id, items with errors/truncated outputs first, "
                             "or spread evenly over all ids (default item_id)")
    parser.add_argument("--thumbnail", type=int, default=THUMBNAIL_SIDE, help="image size in pixels, long side (default 512)")
    args = parser.parse_args(argv)
    if args.sample < 0 or args.thumbnail < 16:
        parser.error("--sample must be >= 0 and --thumbnail >= 16")
    return args


def _settings(cls: type, values: Mapping[str, Any]) -> Any:
    """A settings dataclass from a run summary's config section (unknown keys ignored, missing ones default)."""
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (values or {}).items() if k in known}
    return cls(**kwargs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Beam's GCS client with the default retry budget: an outage is one StorageFailure line, as in a run.
    storage.install()
    args = parse_args(argv)
    try:
        run = load_run(args.output, args.sample, args.order)
    except FileNotFoundError as exc:
        print(f"python -m pipelines.report: {exc}", file=sys.stderr)
        return 2
    config = run.summary.get("config") or {}
    images = load_images(
        (ItemRef.make(item.source_uri, page=item.page, member=item.member) for item in run.sample),
        _settings(DecodeLimits, config.get("decode_limits")),
        _settings(ShardSettings, config.get("shards")),
    )
    write_text(args.html, render(run, images, args.thumbnail))
    shown = sum(1 for image in images.values() if image.image is not None)
    print(f"report: {args.html} ({len(run.sample)} of {run.items_total} items sampled, {shown} with images, "
          f"{sum(g.count for g in run.error_groups)} error rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
