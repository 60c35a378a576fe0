"""Build reference sets without hand labelling (docs/evaluation.md).

    python -m pipelines.references from-pdf --input 'docs/*.pdf' --output refs.parquet [--granularity line|word]
    python -m pipelines.references render-text --text corpus.txt --output evalset/ \
        [--degrade clean --degrade 'rotate=2,blur=1.2,noise=8,jpeg=40'] [--references refs.parquet]

from-pdf: every page with a text layer becomes an item with its text and
text-region boxes (label "text"), keyed as the pipeline keys PDF pages.
render-text: every blank-line-separated paragraph of the text file is drawn
with a real font, once per --degrade variant, as PNGs under --output, with
exact text and boxes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from evaluation.pdf_references import pdf_references
from evaluation.storage import match_sources, read_text, write_references
from evaluation.text_render import Degradation, Layout, find_font, paragraphs, write_rendered_set
from library import storage
from library.formats import DecodeLimits
from schemas.references import GRANULARITIES

_DEFAULT_LIMITS = DecodeLimits()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.references", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    pdf = commands.add_parser("from-pdf", help="references from born-digital PDFs' text layer")
    pdf.add_argument("--input", action="append", required=True,
                     help="glob of PDFs, local or gs://, written exactly as the pipeline's --input will be; repeatable")
    pdf.add_argument("--output", required=True, help="reference file: .parquet, or .jsonl for JSON Lines")
    pdf.add_argument("--pdf_dpi", type=float, default=_DEFAULT_LIMITS.pdf_dpi,
                     help="the pipeline run's --pdf_dpi (sets the recorded page size; boxes are 0-1 either way)")

    text = commands.add_parser("render-text", help="render known text into images with exact references")
    text.add_argument("--text", action="append", required=True,
                      help="UTF-8 text file; each blank-line-separated paragraph becomes one image; repeatable")
    text.add_argument("--output", required=True, help="folder for the PNG images (local or gs://)")
    text.add_argument("--references", help="reference file (default: OUTPUT/references.parquet)")
    text.add_argument("--degrade", action="append",
                      help="a variant: 'clean' or steps like 'rotate=2,blur=1.2,noise=8,jpeg=40'; "
                           "repeat for several variants of every paragraph (default: clean)")
    text.add_argument("--font", help="TrueType font file (default: fontconfig's DejaVu Sans)")
    text.add_argument("--font_size", type=int, default=28)
    text.add_argument("--width", type=int, default=1000, help="image width in pixels")
    text.add_argument("--seed", type=int, default=0, help="noise seed: the same seed gives the same pixels")

    for command in (pdf, text):
        command.add_argument("--granularity", choices=GRANULARITIES, default="line",
                             help="one text box per line (default) or per word")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Beam's GCS client with the default retry budget: an outage is one StorageFailure line, as in a run.
    storage.install()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.command == "from-pdf":
        limits = DecodeLimits(pdf_dpi=args.pdf_dpi)
        items = list(pdf_references(match_sources(args.input), limits, args.granularity))
        destination = args.output
    else:
        layout = Layout(font_path=args.font or find_font(), font_size=args.font_size, width=args.width)
        texts = [p for path in args.text for p in paragraphs(read_text(path))]
        degradations = [Degradation.parse(spec) for spec in args.degrade or ["clean"]]
        items = write_rendered_set(texts, args.output, layout, degradations, args.granularity, args.seed)
        destination = args.references or f"{args.output.rstrip('/')}/references.parquet"
    count = write_references(destination, items)
    boxes = sum(len(item.boxes or ()) for item in items)
    print(f"{count} reference items ({boxes} text boxes) -> {destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
