"""Run an established OCR engine over the pipeline's items and write pipeline-format results.

    python -m pipelines.baselines --engine tesseract|rapidocr --input 'docs/*.pdf' [--input ...] \
        [--manifest list.txt] --output OUT [--pdf_dpi 150] [--max_image_side 3072]

Writes OUT/results/*.parquet (task ocr, model_id e.g. tesseract-5.3.0) and
OUT/errors/*.parquet, so `pipelines.evaluate --results OUT` scores it beside
model runs. Give it the inputs and decode options of the pipeline run it is
compared with: they decide the items, their ids and their pixels.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from evaluation.baselines import ENGINES, run_baseline
from evaluation.storage import match_sources
from library import storage
from library.formats import DecodeLimits
from library.shards import ShardSettings

_DEFAULT_LIMITS = DecodeLimits()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.baselines", description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument("--input", action="append", default=[],
                        help="glob of images/PDFs/shards, local or gs://, as given to the pipeline; repeatable")
    parser.add_argument("--manifest", action="append", default=[], help="manifest of inputs, as given to the pipeline")
    parser.add_argument("--manifest_column", default="uri")
    parser.add_argument("--output", required=True, help="output location: results/ and errors/ go under it")
    parser.add_argument("--pdf_dpi", type=float, default=_DEFAULT_LIMITS.pdf_dpi)
    parser.add_argument("--max_image_side", type=int, default=_DEFAULT_LIMITS.max_side)
    parser.add_argument("--parquet_id_column", default=ShardSettings.parquet_id_column)
    parser.add_argument("--parquet_bytes_column", default=ShardSettings.parquet_bytes_column)
    args = parser.parse_args(argv)
    if not args.input and not args.manifest:
        parser.error("give --input or --manifest")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Beam's GCS client with the default retry budget: an outage is one StorageFailure line, as in a run.
    storage.install()
    args = parse_args(argv)
    limits = DecodeLimits(pdf_dpi=args.pdf_dpi, max_side=args.max_image_side)
    shards = ShardSettings(parquet_id_column=args.parquet_id_column, parquet_bytes_column=args.parquet_bytes_column)
    sources = match_sources(args.input, args.manifest, args.manifest_column)
    run = run_baseline(ENGINES[args.engine](), sources, args.output, limits, shards)
    print(
        f"{run.model_id}: {run.items} items, {run.result_rows} result rows, {run.error_rows} error rows "
        f"in {run.seconds} s -> {run.output}/results/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
