"""Born-digital PDFs: pages/s with `--text_layer auto` (trusted pages never reach the engine) against `model`.

    python -m benchmarks.text_layer [--pdf /usr/share/R/doc/manual/fullrefman.pdf] [--model_pages 16] [--host_pages 200]

One run, side by side on the same document (Debian's r-doc-pdf `fullrefman.pdf`,
2,415 pages of pdfTeX output, by default):

1. `auto`: the whole document through `python -m pipelines.vision_batch --tasks ocr --text_layer auto`;
2. `model`: its first `--model_pages` pages (`--limit`) through the same command with
   `--text_layer model` on the default tiny random-weight model (CPU): every page is rendered and read
   by the engine. A page subset, as the CPU engine takes seconds per page; its wall time includes the
   engine's start-up, which a longer run would spread over more pages;
3. the host side alone, in this process: reading a page's layer (`library.text_layer.read_layers`)
   against rendering it (`library.formats.render_pdf_page`, what `model` pays before the engine), on
   the first `--host_pages` pages, one page at a time.

Pages/s of a run are its pages over its `run_summary.json` wall time (launch to summary). Writes
benchmarks/text_layer.json and BENCHMARKS.md's "Born-digital PDFs" section. The machine is shared:
the load average is recorded beside each figure.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import pyarrow.parquet as pq

from benchmarks import report
from benchmarks.measure import load_average, machine
from library.formats import DecodeLimits, pdf_page_count, render_pdf_page
from library.text_layer import read_layers

_LOG = logging.getLogger("benchmarks.text_layer")
DEFAULT_PDF = "/usr/share/R/doc/manual/fullrefman.pdf"  # Debian r-doc-pdf (scripts/setup_system.sh)
RATIO_TARGET = 20.0  # issue 23: the engine-free path at least 20x the pages/s of the model path


def run_pipeline(pdf: str, output: pathlib.Path, mode: str, limit: int | None) -> dict[str, Any]:
    """One `python -m pipelines.vision_batch` process: its summary's figures and the verdicts of its rows."""
    command = [sys.executable, "-m", "pipelines.vision_batch", "--input", pdf, "--output", str(output),
               "--tasks", "ocr", "--text_layer", mode, "--progress_interval_s", "0"]
    if limit is not None:
        command += ["--limit", str(limit)]
    load = load_average()
    started = time.monotonic()
    subprocess.run(command, cwd=report.REPO, check=True, capture_output=True)
    process_wall = time.monotonic() - started
    summary = json.loads((output / "run_summary.json").read_text())
    rows = pq.read_table(output / "results", columns=["text_source", "text_layer_verdict"]).to_pylist()
    pages = summary["counts"]["pages"]
    return {
        "mode": mode,
        "command": " ".join(command[1:]).replace(str(output), "OUT"),
        "pages": pages,
        "state": summary["state"],
        "run_wall_s": summary["wall_time_s"],
        "process_wall_s": round(process_wall, 3),
        "pages_per_s": round(pages / summary["wall_time_s"], 4),
        "tasks_submitted": summary["counts"]["tasks_submitted"],
        "tasks_from_text_layer": summary["counts"]["tasks_from_text_layer"],
        "pages_not_rendered": summary["counts"]["pages_not_rendered"],
        "verdicts": dict(collections.Counter(row["text_layer_verdict"] for row in rows)),
        "text_sources": dict(collections.Counter(row["text_source"] for row in rows)),
        "load_1min_before": load,
    }


def host_side(pdf: str, pages: int) -> dict[str, Any]:
    """Per page, one at a time: reading its layer against rendering it at the default 150 dpi."""
    data = pathlib.Path(pdf).read_bytes()
    limits = DecodeLimits()
    started = time.perf_counter()
    for page in range(pages):
        read_layers(data, [page])
    layer_s = time.perf_counter() - started
    started = time.perf_counter()
    for page in range(pages):
        render_pdf_page(data, page, limits)
    render_s = time.perf_counter() - started
    return {
        "pages": pages,
        "layer_pages_per_s": round(pages / layer_s, 2),
        "render_pages_per_s": round(pages / render_s, 2),
        "render_over_layer_time": round(render_s / layer_s, 2),
        "load_1min_before": load_average(),
    }


SECTION = "## Born-digital PDFs: the text layer against the model"
NEXT_SECTION = "## How each figure is measured"


def write_section(body: str) -> None:
    """This benchmark's section of BENCHMARKS.md replaced (or inserted before the definitions), the rest as it is:
    the other sections keep what their own commands last wrote."""
    path = report.REPO / "BENCHMARKS.md"
    text = path.read_text()
    if SECTION in text:
        before, rest = text.split(SECTION, 1)
        after = rest[rest.index("\n## "):] if "\n## " in rest else "\n"
    else:
        before, after = text.split(NEXT_SECTION, 1)
        after = "\n" + NEXT_SECTION + after
    path.write_text(f"{before}{SECTION}\n\n{body}\n{after}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdf", default=DEFAULT_PDF)
    parser.add_argument("--model_pages", type=int, default=16, help="pages of the model-mode run (--limit)")
    parser.add_argument("--host_pages", type=int, default=200, help="pages of the host-side comparison")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started_utc = datetime.datetime.now(datetime.timezone.utc)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-text-layer-") as workdir:
        _LOG.info("auto: the whole document")
        auto = run_pipeline(args.pdf, pathlib.Path(workdir) / "auto", "auto", None)
        _LOG.info("model: the first %d pages", args.model_pages)
        model = run_pipeline(args.pdf, pathlib.Path(workdir) / "model", "model", args.model_pages)
    _LOG.info("host side: %d pages", args.host_pages)
    host = host_side(args.pdf, args.host_pages)
    ratio = round(auto["pages_per_s"] / model["pages_per_s"], 1)
    document = {
        "command": "python -m benchmarks.text_layer " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": started_utc.date().isoformat(),
        "started_utc": started_utc.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": {**machine(), "load_1min_at_start": auto["load_1min_before"]},
        "pdf": {"path": args.pdf, "pages": pdf_page_count(pathlib.Path(args.pdf).read_bytes()),
                "bytes": os.path.getsize(args.pdf)},
        "runs": {"auto": auto, "model": model},
        "host": host,
        "ratio": {"auto_over_model_pages_per_s": ratio, "target": RATIO_TARGET, "met": ratio >= RATIO_TARGET},
    }
    report.RESULTS_FILES["text_layer"].write_text(json.dumps(document, indent=2) + "\n")
    write_section(report.text_layer_markdown(document))
    _LOG.info("auto %.2f pages/s, model %.4f pages/s: %.1fx", auto["pages_per_s"], model["pages_per_s"], ratio)


if __name__ == "__main__":
    main()
