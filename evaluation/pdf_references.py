"""References from born-digital PDFs: the text layer is the transcription, its boxes are text regions.

A PDF produced by software (not a scan) already says what text each page
holds and where: PDFium's text API gives the page text, a box per
character and PDFium's own segmentation of the text into line runs. Each
page is rendered exactly as the pipeline renders it
(`library.formats.render_pdf_page`), so the reference's size is the
item's size, and boxes are mapped to that render with PDFium's
page-to-device transform (which applies the crop box and /Rotate the same
way rendering does), then normalised to 0-1.

Pages without a text layer (scanned pages inside a born-digital file) are
skipped: an empty reference would claim the page has no text.
"""
from __future__ import annotations

import ctypes
import logging
import unicodedata
from typing import Iterable, Iterator, Optional

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from library.formats import DecodeLimits, Format, pdf_page_count, read_bytes, render_pdf_page, sniff
from schemas.records import ItemRef, SourceFile
from schemas.references import GRANULARITIES, TEXT_REGION_LABEL, ReferenceBox, ReferenceItem

_LOG = logging.getLogger(__name__)

ORIGIN = "pdf-text-layer"
# FPDF_PageToDevice returns whole device pixels; mapping onto a grid this
# much finer than the render keeps boxes to 1/16 pixel.
_SUBPIXEL = 16


# PDFium replaces a hyphen that breaks a word at the end of a line, and the
# line break itself, by one marker (U+FFFE; U+0002 in older builds). The
# page shows "-" and a new line, and that is what a reader transcribes.
_LINE_END_HYPHENS = ("\ufffe", "\x02")


def clean_text(text: str) -> str:
    """PDFium's page text as printed: "\\n" line breaks, line-end hyphens restored, no control characters."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    for marker in _LINE_END_HYPHENS:
        text = text.replace(marker, "-\n")
    return "".join(c for c in text if c in "\n\t" or not unicodedata.category(c).startswith("C"))


class _PageFrame:
    """Maps PDF page coordinates to 0-1 fractions of the rendered page."""

    def __init__(self, page: pdfium.PdfPage, width: int, height: int):
        self._page = page
        self._width = width * _SUBPIXEL
        self._height = height * _SUBPIXEL

    def _device(self, x: float, y: float) -> tuple[float, float]:
        dx, dy = ctypes.c_int(), ctypes.c_int()
        pdfium_c.FPDF_PageToDevice(self._page.raw, 0, 0, self._width, self._height, 0, x, y, dx, dy)
        return dx.value / self._width, dy.value / self._height

    def box(self, left: float, bottom: float, right: float, top: float) -> Optional[tuple[float, float, float, float]]:
        """(ymin, xmin, ymax, xmax) in 0-1, or None for a box with no area on the render."""
        (x0, y0), (x1, y1) = self._device(left, top), self._device(right, bottom)
        ymin, ymax = sorted((min(1.0, max(0.0, y0)), min(1.0, max(0.0, y1))))
        xmin, xmax = sorted((min(1.0, max(0.0, x0)), min(1.0, max(0.0, x1))))
        return (ymin, xmin, ymax, xmax) if ymin < ymax and xmin < xmax else None


def _union(boxes: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    lefts, bottoms, rights, tops = zip(*boxes)
    return min(lefts), min(bottoms), max(rights), max(tops)


def word_boxes(textpage: pdfium.PdfTextPage, frame: _PageFrame) -> list[ReferenceBox]:
    """One box per whitespace-separated word: the union of its characters' glyph boxes."""
    words: list[ReferenceBox] = []
    chars: list[str] = []
    glyphs: list[tuple[float, float, float, float]] = []

    def close_word() -> None:
        box = frame.box(*_union(glyphs)) if glyphs else None
        if box and "".join(chars).strip():
            words.append(ReferenceBox(label=TEXT_REGION_LABEL, box=box, text=clean_text("".join(chars))))
        chars.clear()
        glyphs.clear()

    for index in range(textpage.count_chars()):
        char = chr(pdfium_c.FPDFText_GetUnicode(textpage.raw, index))
        line_end_hyphen = char in _LINE_END_HYPHENS
        if not line_end_hyphen and (char.isspace() or unicodedata.category(char).startswith("C")):
            close_word()
            continue
        chars.append("-" if line_end_hyphen else char)
        left, bottom, right, top = textpage.get_charbox(index)
        if right > left and top > bottom:
            glyphs.append((left, bottom, right, top))
        if line_end_hyphen:
            close_word()  # the word goes on at the start of the next line: a second box
    close_word()
    return words


def line_boxes(textpage: pdfium.PdfTextPage, frame: _PageFrame) -> list[ReferenceBox]:
    """PDFium's text runs: one rectangle per stretch of text on one line (what a reader calls a line)."""
    lines = []
    for index in range(textpage.count_rects()):
        left, bottom, right, top = textpage.get_rect(index)
        text = " ".join(clean_text(textpage.get_text_bounded(left, bottom, right, top)).split())
        box = frame.box(left, bottom, right, top)
        if box and text:
            lines.append(ReferenceBox(label=TEXT_REGION_LABEL, box=box, text=text))
    return lines


def page_reference(
    data: bytes, uri: str, page_index: int, limits: DecodeLimits, granularity: str = "line"
) -> Optional[ReferenceItem]:
    """The reference for one PDF page as the pipeline sees it, or None when it has no text layer."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    width, height = render_pdf_page(data, page_index, limits).size
    document = pdfium.PdfDocument(data)
    try:
        page = document[page_index]
        textpage = page.get_textpage()
        text = clean_text(textpage.get_text_range()).strip()
        if not text:
            return None
        frame = _PageFrame(page, width, height)
        boxes = line_boxes(textpage, frame) if granularity == "line" else word_boxes(textpage, frame)
    finally:
        document.close()
    return ReferenceItem(
        ref=ItemRef.make(uri, page=page_index),
        width=width,
        height=height,
        text=text,
        boxes=tuple(boxes),
        origin=f"{ORIGIN}:{granularity}",
    )


def pdf_references(sources: Iterable[SourceFile], limits: DecodeLimits, granularity: str = "line") -> Iterator[ReferenceItem]:
    """References for every page with a text layer in every PDF among `sources` (others are logged and skipped)."""
    for source in sources:
        data = read_bytes(source.uri, limits.max_file_bytes)
        if sniff(data[:1024]) is not Format.PDF:
            _LOG.warning("skipping %s: not a PDF", source.uri)
            continue
        for page_index in range(pdf_page_count(data)):
            reference = page_reference(data, source.uri, page_index, limits, granularity)
            if reference is None:
                _LOG.warning("skipping %s page %d: no text layer", source.uri, page_index)
                continue
            yield reference
