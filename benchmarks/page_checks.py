"""Page checks measured on real pages: orientation accuracy and CPU per page, blank-page precision on faint scans.

    python -m benchmarks.page_checks [--pages 120] [--blanks 100] [--pdf PATH ...] [--json benchmarks/page_checks.json]

(`--blanks 0` measures orientation only.)

Pages come from PDFs this project did not write: Debian's R manuals
(r-doc-pdf, /usr/share/doc/r-doc-pdf/manual/*.pdf) unless `--pdf` names
others. Text pages (at least `MIN_TEXT_CHARS` characters in their text
layer) are picked evenly through each document, rendered at 150 dpi as the
pipeline renders them (`library.formats.render_pdf_page`), and:

- **Orientation**: each page turned 0, 90, 180 and 270 degrees clockwise,
  half of them made scan-like (`scan_like`), and given to
  `library.page_checks.detect_rotation`; right when it answers the turn that
  undoes ours. Its first look alone (OSD at ~150 dpi, the detector before
  the second look was added) is scored on the same samples, side by side.
  CPU per page is this process's and Tesseract's (its child) CPU time, so a
  shared machine's load inflates wall time but not this.
- **Blank pages**: scan-like empty pages (paper tint, uneven light, grain,
  dust, blur, JPEG, a scanner's dark border) should be called blank; pages
  holding only a little real content, cut from the same rendered pages,
  should not: the page number alone, one digit of it, one line of text, and a faint stamp
  (a line at a quarter of its contrast, scaled up), each made scan-like.
  Precision is the share of "blank" calls that were blank pages.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import pathlib
import resource
import statistics
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFilter

from library.formats import DecodeLimits, render_pdf_page
from library.page_checks import MARK_PIXELS, OSD_MIN_CONFIDENCE, ROTATIONS, checked_grey, detect_rotation, largest_mark, turn_upright

DEFAULT_PDFS = tuple(sorted(pathlib.Path("/usr/share/doc/r-doc-pdf/manual").glob("*.pdf")))
MIN_TEXT_CHARS = 400  # a text page: a title page or a figure has fewer
LIMITS = DecodeLimits()  # 150 dpi, the pipeline's default


def text_pages(pdf: pathlib.Path, count: int) -> list[int]:
    """Up to `count` page indexes of `pdf` with a text layer of MIN_TEXT_CHARS or more, spread through it."""
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(str(pdf))
    try:
        total = len(document)
        chosen = []
        for index in np.linspace(0, total - 1, num=min(total, count * 3)).astype(int):
            page = document[int(index)]
            chars = page.get_textpage().count_chars()
            page.close()
            if chars >= MIN_TEXT_CHARS and int(index) not in chosen:
                chosen.append(int(index))
            if len(chosen) == count:
                break
        return chosen
    finally:
        document.close()


@functools.lru_cache(maxsize=4)
def _bytes(pdf: pathlib.Path) -> bytes:
    return pdf.read_bytes()


def render(pdf: pathlib.Path, page: int) -> Image.Image:
    return render_pdf_page(_bytes(pdf), page, LIMITS)


def scan_like(image: Image.Image, rng: np.random.Generator, border: bool = True) -> Image.Image:
    """`image` as a flatbed scan might give it: tinted paper, uneven light, blur, grain, dust, JPEG, a dark edge."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = pixels.shape[:2]
    pixels *= rng.uniform(0.88, 1.0, size=3)  # paper tint
    light = np.linspace(-1.0, 1.0, width)[None, :, None] * rng.uniform(0, 12)  # uneven light across the page
    pixels += light
    blurred = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    pixels = np.asarray(blurred, dtype=np.float32) + rng.normal(0, rng.uniform(1.5, 7.0), size=pixels.shape)  # grain
    for _ in range(int(rng.integers(0, 40))):  # dust: specks of 1-2 px
        y, x, size = int(rng.integers(0, height - 2)), int(rng.integers(0, width - 2)), int(rng.integers(1, 3))
        pixels[y: y + size, x: x + size] -= rng.uniform(60, 160)
    if border and rng.random() < 0.5:  # the scanner lid's shadow along one edge, within 1 % of the page
        strip = max(1, int(rng.uniform(0.002, 0.01) * width))
        pixels[:, :strip] *= 0.3
    scanned = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    scanned.save(buffer, "JPEG", quality=int(rng.integers(50, 90)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_orientation(pages: Sequence[tuple[pathlib.Path, int]], seed: int = 0) -> dict[str, Any]:
    """`detect_rotation` on every page turned every way; its first look alone (Tesseract's OSD at ~150 dpi,
    acted on at OSD_MIN_CONFIDENCE, the detector before the second look) scored on the same samples."""
    rng = np.random.default_rng(seed)
    results, cpu = [], []
    for number, (pdf, index) in enumerate(pages):
        upright = render(pdf, index)
        scanned = number % 2 == 1
        if scanned:
            upright = scan_like(upright, rng, border=False)
        for turned_by in ROTATIONS:
            # Turning the source back by `turned_by` is what the detector must answer.
            source = turn_upright(upright, (360 - turned_by) % 360)
            started = _cpu()
            found = detect_rotation(checked_grey(source))
            cpu.append(_cpu() - started)
            first = found.looks[0] if found.looks else None
            first_answer = first.rotation if first is not None and first.confidence >= OSD_MIN_CONFIDENCE else 0
            results.append({
                "pdf": pdf.name, "page": index, "scanned": scanned, "turned": turned_by, "answer": found.rotation,
                "right": found.rotation == turned_by, "first_look_right": first_answer == turned_by,
                "looks": [None if look is None else [look.scale, look.rotation, look.confidence] for look in found.looks],
                "line_axis": None if found.line_axis is None else round(found.line_axis, 2), "cpu_s": round(cpu[-1], 3),
            })
    right = sum(r["right"] for r in results)
    one_look = [r["cpu_s"] for r in results if len(r["looks"]) == 1]
    two_looks = [r["cpu_s"] for r in results if len(r["looks"]) == 2]
    return {
        "samples": len(results), "right": right, "accuracy": right / len(results),
        "accuracy_as_rendered": _share(r["right"] for r in results if not r["scanned"]),
        "accuracy_scan_like": _share(r["right"] for r in results if r["scanned"]),
        # An upright page turned: the error that harms a page that was fine.
        "false_turns": sum(1 for r in results if r["turned"] == 0 and r["answer"] != 0),
        "first_look_only": {
            "accuracy": _share(r["first_look_right"] for r in results),
            "accuracy_as_rendered": _share(r["first_look_right"] for r in results if not r["scanned"]),
            "accuracy_scan_like": _share(r["first_look_right"] for r in results if r["scanned"]),
            "false_turns": sum(1 for r in results if r["turned"] == 0 and not r["first_look_right"]),
        },
        "second_looks": len(two_looks),
        "wrong": [r for r in results if not r["right"]],
        "cpu_s_per_page": {"mean": statistics.mean(cpu), "median": statistics.median(cpu), "max": max(cpu),
                           "one_look_mean": statistics.mean(one_look) if one_look else None,
                           "two_looks_mean": statistics.mean(two_looks) if two_looks else None},
    }


def _share(values: Iterator[bool]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _chars(pdf: pathlib.Path, index: int) -> tuple[list[tuple[float, float, float, float]], str, tuple[float, float]]:
    """The page's character boxes (left, bottom, right, top in points), its text and its size in points."""
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(str(pdf))
    try:
        page = document[index]
        text = page.get_textpage()
        boxes = [text.get_charbox(i) for i in range(text.count_chars())]
        return boxes, text.get_text_range(), page.get_size()
    finally:
        document.close()


def content_regions(pdf: pathlib.Path, index: int) -> dict[str, tuple[int, int, int, int]]:
    """Pixel boxes (left, top, right, bottom) at 150 dpi of the page's number (its first run of digits), that
    number's last digit alone, and the page's first line."""
    boxes, text, (_, height_pt) = _chars(pdf, index)
    scale = LIMITS.pdf_dpi / 72.0

    def to_px(chosen: list[tuple[float, float, float, float]]) -> tuple[int, int, int, int]:
        left, bottom, right, top = (min(b[0] for b in chosen), min(b[1] for b in chosen),
                                    max(b[2] for b in chosen), max(b[3] for b in chosen))
        return int(left * scale) - 2, int((height_pt - top) * scale) - 2, int(right * scale) + 3, int((height_pt - bottom) * scale) + 3

    regions = {}
    digits = [i for i, ch in enumerate(text[: len(boxes)]) if ch.isdigit()]
    if digits:  # the page number: the first run of digits (R manuals print it in the running head)
        run = [digits[0]]
        while run[-1] + 1 < len(boxes) and text[run[-1] + 1].isdigit():
            run.append(run[-1] + 1)
        regions["page_number"] = to_px([boxes[i] for i in run])
        regions["one_digit"] = to_px([boxes[run[-1]]])
    line_end = text.find("\n", 0, len(boxes))
    first_line = [boxes[i] for i in range(line_end if line_end > 0 else min(len(boxes), 40)) if not text[i].isspace()]
    if first_line:
        regions["one_line"] = to_px(first_line)
    return regions


def near_blank(page: Image.Image, region: tuple[int, int, int, int], kind: str, rng: np.random.Generator) -> Image.Image:
    """An empty page holding only `region` of `page`: as it was, or as a faint stamp (a quarter of its contrast, scaled up)."""
    blank = Image.new("RGB", page.size, "white")
    crop = page.crop(region)
    if kind == "faint_stamp":
        crop = crop.resize((crop.width * 2, crop.height * 2), Image.Resampling.BICUBIC)
        faint = 255.0 - 0.25 * (255.0 - np.asarray(crop, dtype=np.float32))
        crop = Image.fromarray(faint.astype(np.uint8))
        where = (int(rng.integers(page.width // 8, max(page.width // 8 + 1, page.width - crop.width - page.width // 8))),
                 int(rng.integers(page.height // 8, page.height // 2)))
    else:
        where = region[:2]
    blank.paste(crop, where)
    return blank


def measure_blanks(pages: Sequence[tuple[pathlib.Path, int]], count: int, seed: int = 1) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    cases: list[tuple[str, bool, Image.Image]] = []
    size = render(*pages[0]).size
    for _ in range(count):
        cases.append(("blank_scan", True, scan_like(Image.new("RGB", size, "white"), rng)))
    for number, (pdf, index) in enumerate(pages):
        page = render(pdf, index)
        regions = content_regions(pdf, index)
        for kind, region_name in (("page_number", "page_number"), ("one_digit", "one_digit"), ("one_line", "one_line"),
                                  ("faint_stamp", "one_line")):
            if region_name in regions:
                cases.append((kind, False, scan_like(near_blank(page, regions[region_name], kind, rng), rng)))
        if sum(1 for case in cases if not case[1]) >= count * 4:
            break
    calls, cpu = [], []
    for kind, blank, image in cases:
        started = _cpu()
        mark = largest_mark(checked_grey(image))
        cpu.append(_cpu() - started)
        calls.append({"kind": kind, "blank": blank, "called_blank": mark < MARK_PIXELS, "largest_mark": mark})
    called = [c for c in calls if c["called_blank"]]
    by_kind = {}
    for kind in dict.fromkeys(c["kind"] for c in calls):
        of_kind = [c for c in calls if c["kind"] == kind]
        by_kind[kind] = {"pages": len(of_kind), "called_blank": sum(c["called_blank"] for c in of_kind),
                         "smallest_mark": min(c["largest_mark"] for c in of_kind),
                         "largest_mark": max(c["largest_mark"] for c in of_kind)}
    return {
        "pages": len(calls),
        "precision": sum(c["blank"] for c in called) / len(called) if called else float("nan"),
        "recall": sum(c["called_blank"] for c in calls if c["blank"]) / max(1, sum(c["blank"] for c in calls)),
        "false_blank": sum(1 for c in called if not c["blank"]),
        "by_kind": by_kind,
        "cpu_s_per_page": {"mean": statistics.mean(cpu), "median": statistics.median(cpu), "max": max(cpu)},
    }


def pick_pages(pdfs: Sequence[pathlib.Path], total: int) -> list[tuple[pathlib.Path, int]]:
    per = max(1, -(-total // len(pdfs)))
    pages = [(pdf, index) for pdf in pdfs for index in text_pages(pdf, per)]
    return pages[:total]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=120, help="text pages for the orientation measurement (x4 turns)")
    parser.add_argument("--blanks", type=int, default=100,
                        help="blank scans (and up to 4x as many near-blank pages); 0: not measured, and --json keeps the file's blank figures")
    parser.add_argument("--pdf", action="append", type=pathlib.Path, help="PDFs to take pages from (default: Debian's R manuals)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the figures here too")
    args = parser.parse_args(argv)
    pdfs = tuple(args.pdf or DEFAULT_PDFS)
    if not pdfs:
        sys.exit("no PDFs: install Debian's r-doc-pdf (scripts/setup_system.sh) or name some with --pdf")
    started = time.time()
    pages = pick_pages(pdfs, args.pages)
    figures = {
        "pdfs": [str(p) for p in pdfs],
        "orientation": measure_orientation(pages),
        "blank": measure_blanks(pick_pages(pdfs, args.blanks), args.blanks) if args.blanks else None,
        "wall_s": None,
    }
    figures["wall_s"] = round(time.time() - started, 1)
    if figures["blank"] is None and args.json and args.json.exists():
        figures["blank"] = json.loads(args.json.read_text()).get("blank")  # measured by an earlier run
    text = json.dumps(figures, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
