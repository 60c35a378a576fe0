"""A PDF page's text layer, read with PDFium before anything is rendered, and whether it can be trusted.

Born-digital pages carry their text exactly; scans carry none, or an
invisible layer a scanner's OCR wrote; some layers are garbage (fonts
without a ToUnicode map: opendatalab/MinerU#4742) and some miss the text
inside a figure (allenai/olmocr#118). `read_layers` measures, per page, the
signals that tell these apart (`LayerSignals`) from PDFium's text page and
page objects, without rendering a pixel, and `verdict` turns them into one
of the `Verdict`s with the thresholds stated beside them. The text itself
(`PageLayer.text`) is PDFium's extraction, with the line breaks and spaces
PDFium infers from glyph positions, in reading order: the page's line
segments ordered by recursive XY-cut (library/reading_order.py) where it
finds columns, the content stream's order where it finds none.

Only pypdfium2 (already the renderer) and its raw PDFium API: no Beam.
"""
from __future__ import annotations

import ctypes
import dataclasses
import enum
import math
import unicodedata
from typing import Iterator, Optional, Sequence

from rapidfuzz.distance import Levenshtein

from library.formats import PDFIUM_LOCK, open_pdf
from library.reading_order import MIN_COLUMN_GAP_EMS, Box, reading_order


# Part of the fingerprint of every text-layer answer (tasks.task.TaskFingerprints): bump it when the
# extraction or the verdict rules change, and incremental runs read the affected pages' layers again.
READER_VERSION = 2  # 2: reading order (XY-cut over columns)


class Verdict(enum.Enum):
    """What a page's text layer is worth (README "Born-digital PDFs" says what each means for a run)."""

    TRUSTED = "trusted"  # born-digital text covering the page's visible content
    PARTIAL = "partial"  # text, plus images whose content the layer lacks
    GARBLED = "garbled"  # characters without a Unicode meaning, or an implausible mix
    OCR_LAYER = "ocr_layer"  # invisible text (render mode 3) over a scan: only as good as the scanner's OCR
    NONE = "none"  # no text to speak of (a scan, a blank page, a vector-only drawing)


# Thresholds, measured on real documents (BENCHMARKS.md "Text layer verdicts" gives the distributions):
# - MIN_CHARS: a page with images and fewer characters than this has no layer worth reading (a
#   scan with a page number or a stamp). Without images, a sparse page's few characters are all it
#   shows: R's fullrefman.pdf has 7 such pages (9-16 characters: a running head and a page number).
MIN_CHARS = 20
# - MAX_BAD_FRACTION: characters with no Unicode meaning (private use, U+FFFD, controls, or PDFium's
#   own "this glyph has no valid mapping", FPDFText_HasUnicodeMapError). Clean TeX, LibreOffice
#   and Ghostscript output has none; a font whose ToUnicode map was removed turns most glyphs into
#   them. 2 % leaves room for a stray dingbat or logo glyph.
MAX_BAD_FRACTION = 0.02
# - MIN_PLAUSIBLE_FRACTION: letters, digits, spaces and ordinary punctuation among the characters;
#   real text of any script is above 0.9, glyph-index soup (a font mapped to the wrong code points)
#   falls under it as symbols and unassigned points pile up.
MIN_PLAUSIBLE_FRACTION = 0.75
# - OCR_LAYER_FRACTION: most of the text invisible (render mode 3, PDF 32000-1:2008 table 106) is
#   what OCR tools write over a scan (ocrmypdf, Acrobat's "searchable image"); visible text pages have none.
OCR_LAYER_FRACTION = 0.5
# - PARTIAL_IMAGE_COVERAGE: images covering more of the page than this may hold text the layer lacks
#   (a screenshot, a scanned figure, a chart). Logos and rules stay under it.
PARTIAL_IMAGE_COVERAGE = 0.15
_COVERAGE_GRID = 64  # image coverage is the union of image boxes on a 64 x 64 grid over the page

_PLAUSIBLE_CATEGORIES = ("L", "N", "Z", "P")  # Unicode general categories of letters, digits, spaces, punctuation
_PLAUSIBLE_SYMBOLS = set("+-=<>|~^`$%&#@*/\\'\"()[]{}_°©®§•·–—")


@dataclasses.dataclass(frozen=True)
class LayerSignals:
    """What PDFium measures of one page's layer: the inputs of `verdict`."""

    chars: int  # characters of the layer, whitespace and PDFium's generated breaks left out
    bad_chars: int  # of them: private use, U+FFFD, controls, or a glyph PDFium could not map to Unicode
    implausible_chars: int  # of them: neither letter, digit, space, punctuation nor a common symbol
    invisible_chars: int  # of them: drawn in text render mode 3 (invisible)
    image_coverage: float  # fraction of the page's area under image objects (union, forms included)
    width_pt: float
    height_pt: float


@dataclasses.dataclass(frozen=True)
class PageLayer:
    """One page's text layer, its signals and its verdict."""

    page: int
    text: str
    signals: LayerSignals
    verdict: Verdict


def verdict(signals: LayerSignals) -> Verdict:
    """The verdict of a page's signals: the first rule that holds, in the order the thresholds are listed."""
    if not signals.chars or (signals.chars < MIN_CHARS and signals.image_coverage > 0):
        return Verdict.NONE
    if signals.invisible_chars >= OCR_LAYER_FRACTION * signals.chars:
        return Verdict.OCR_LAYER
    if signals.bad_chars > MAX_BAD_FRACTION * signals.chars:
        return Verdict.GARBLED
    if signals.chars - signals.implausible_chars < MIN_PLAUSIBLE_FRACTION * signals.chars:
        return Verdict.GARBLED
    if signals.image_coverage > PARTIAL_IMAGE_COVERAGE:
        return Verdict.PARTIAL
    return Verdict.TRUSTED


def _bad(char: str) -> bool:
    code = ord(char)
    return (
        char == "\ufffd"
        or 0xE000 <= code <= 0xF8FF  # Basic Multilingual Plane private use area
        or code >= 0xF0000  # supplementary private use planes
        or (unicodedata.category(char) == "Cc" and char not in "\t\n\r")
    )


def _plausible(char: str) -> bool:
    return unicodedata.category(char)[0] in _PLAUSIBLE_CATEGORIES or char in _PLAUSIBLE_SYMBOLS


def _objects(raw, count: int, get, handle) -> Iterator[object]:
    """Page objects, descending into form XObjects (whose images and text are the page's too)."""
    for index in range(count):
        obj = get(handle, index)
        if raw.FPDFPageObj_GetType(obj) == raw.FPDF_PAGEOBJ_FORM:
            yield from _objects(raw, raw.FPDFFormObj_CountObjects(obj), raw.FPDFFormObj_GetObject, obj)
        else:
            yield obj


def _image_coverage(raw, page, box: tuple[float, float, float, float]) -> float:
    """Fraction of the page's `box` (its crop box, in the unrotated user space object bounds are in) under
    image objects: their boxes' union on a coarse grid, so overlaps count once."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return 0.0
    cell_x, cell_y = (x1 - x0) / _COVERAGE_GRID, (y1 - y0) / _COVERAGE_GRID
    covered: set[tuple[int, int]] = set()
    left, bottom, right, top = (ctypes.c_float() for _ in range(4))
    for obj in _objects(raw, raw.FPDFPage_CountObjects(page), raw.FPDFPage_GetObject, page):
        if raw.FPDFPageObj_GetType(obj) != raw.FPDF_PAGEOBJ_IMAGE or not raw.FPDFPageObj_GetBounds(obj, left, bottom, right, top):
            continue
        cols = range(max(0, int((left.value - x0) / cell_x)), min(_COVERAGE_GRID, math.ceil((right.value - x0) / cell_x)))
        rows = range(max(0, int((bottom.value - y0) / cell_y)), min(_COVERAGE_GRID, math.ceil((top.value - y0) / cell_y)))
        covered.update((c, r) for c in cols for r in rows)
    return len(covered) / (_COVERAGE_GRID * _COVERAGE_GRID)


@dataclasses.dataclass
class _Segment:
    """A run of one line's characters with no wide gap: its box (the union of the characters' loose boxes,
    which span the font's ascent to descent) and its text, the whitespace that followed it included."""

    box: Box
    text: list[str]

    def extend(self, box: Box) -> None:
        self.box = (min(self.box[0], box[0]), min(self.box[1], box[1]), max(self.box[2], box[2]), max(self.box[3], box[3]))

    def end(self, raw, textpage, index: int, rect) -> None:
        """A word ends at character `index`: the segment reaches its right edge (its height came with its first)."""
        raw.FPDFText_GetLooseCharBox(textpage, index, rect)
        if rect.right > self.box[2]:
            self.box = (self.box[0], self.box[1], rect.right, self.box[3])


def _loose_box(raw, textpage, index: int, rect) -> Box:
    """A character's loose box (FPDFText_GetLooseCharBox: its advance across the font's ascent to descent)."""
    raw.FPDFText_GetLooseCharBox(textpage, index, rect)
    return (rect.left, rect.bottom, rect.right, rect.top)


def _continues(previous: Box, box: Box) -> bool:
    """Whether a character's box continues the line segment that ends with `previous`: on the same line
    (half its height shared), not behind it, and no column gap (`MIN_COLUMN_GAP_EMS`) in between."""
    height = max(min(previous[3] - previous[1], box[3] - box[1]), 1e-3)
    shared = min(previous[3], box[3]) - max(previous[1], box[1])
    gap = box[0] - previous[2]
    return shared >= 0.5 * height and -height <= gap <= MIN_COLUMN_GAP_EMS * height


_HYPHEN_JOIN = "\x02"  # FPDFText_GetUnicode's code for a hyphen PDFium joins across a line break


def _ordered_text(segments: list[_Segment], order: list[int]) -> str:
    """The segments' text in `order`: segments that follow each other as written keep the whitespace
    between them (a space at least), every other join is a line break."""
    pieces: list[str] = []
    for position, index in enumerate(order):
        if position:
            previous = "".join(segments[order[position - 1]].text)
            trail = previous[len(previous.rstrip()):]
            if index != order[position - 1] + 1:
                pieces.append("\n")
            elif not previous.endswith(_HYPHEN_JOIN):
                pieces.append(trail or " ")
        pieces.append("".join(segments[index].text).rstrip())
    # PDFium's mark of a word hyphenated at a line's end is U+0002 per character, U+FFFE in its text: `_normalised` joins both.
    return "".join(pieces)


def _read_page(document, index: int) -> PageLayer:
    import pypdfium2.raw as raw

    page = document[index]
    try:
        width, height = page.get_size()
        textpage = page.get_textpage()
        try:
            text = textpage.get_text_range()
            chars = bad = implausible = invisible = 0
            modes: dict[int, int] = {}  # text object address -> its render mode
            segments: list[_Segment] = []
            # Boxes are read at words' ends only (a word's characters go with its first): a third of the calls.
            rect, broken, word_end = raw.FS_RECTF(), False, -1  # word_end: the word being read's last character so far
            for i in range(textpage.count_chars()):
                code = raw.FPDFText_GetUnicode(textpage.raw, i)
                char = chr(code) if code < 0x110000 else "\ufffd"
                if char.isspace() or raw.FPDFText_IsGenerated(textpage.raw, i) == 1:
                    if word_end >= 0:
                        segments[-1].end(raw, textpage.raw, word_end, rect)
                        word_end = -1
                    if segments:
                        segments[-1].text.append(char)
                    broken = broken or char in "\r\n"
                    continue
                if word_end < 0:  # a word's first character: the segment goes on with it, or a new one starts
                    box = _loose_box(raw, textpage.raw, i, rect)
                    if segments and not broken and _continues(segments[-1].box, box):
                        segments[-1].extend(box)
                    else:
                        segments.append(_Segment(box, []))
                segments[-1].text.append(char)
                word_end, broken = i, False
                chars += 1
                if _bad(char) or raw.FPDFText_HasUnicodeMapError(textpage.raw, i) == 1:
                    bad += 1
                elif not _plausible(char):
                    implausible += 1
                obj = raw.FPDFText_GetTextObject(textpage.raw, i)
                address = ctypes.cast(obj, ctypes.c_void_p).value or 0
                if address not in modes:
                    modes[address] = raw.FPDFTextObj_GetTextRenderMode(obj) if address else -1
                if modes[address] == raw.FPDF_TEXTRENDERMODE_INVISIBLE:
                    invisible += 1
            if word_end >= 0:
                segments[-1].end(raw, textpage.raw, word_end, rect)
            order = reading_order([segment.box for segment in segments])
            if order is not None:
                text = _ordered_text(segments, order)
        finally:
            textpage.close()
        coverage = _image_coverage(raw, page.raw, page.get_cropbox())
    finally:
        page.close()
    signals = LayerSignals(chars, bad, implausible, invisible, round(coverage, 4), width, height)
    return PageLayer(index, _normalised(text), signals, verdict(signals))


def _normalised(text: str) -> str:
    """PDFium's text with Unix line ends, hyphenated words joined and trailing spaces gone: what a reader expects."""
    # PDFium joins a word hyphenated at a line's end and marks the join with U+FFFE; the word is whole.
    lines = text.replace("\ufffe", "").replace(_HYPHEN_JOIN, "").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def read_layers(data: bytes, pages: Sequence[int]) -> list[PageLayer]:
    """The text layers of `pages` of a PDF's bytes, in order: nothing is rendered."""
    with PDFIUM_LOCK:
        document = open_pdf(data)
        try:
            return [_read_page(document, page) for page in pages]
        finally:
            document.close()


def comparable(text: str) -> str:
    """NFKC with whitespace runs as one space: what two readings of a page are compared on, and what the
    evaluation scores OCR on (`evaluation.metrics` imports it): layout and ligatures ("ﬁ" as one
    character, line breaks where the model has none) are not reading errors."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


# Levenshtein distance (rapidfuzz's C++ implementation: a page's two readings are thousands of characters).
edit_distance = Levenshtein.distance


def disagreement(layer: str, model: str) -> Optional[float]:
    """CER of the model's reading against the layer's (edits over the layer's characters, `comparable` forms).

    None when the layer holds no text to compare with.
    """
    reference, hypothesis = comparable(layer), comparable(model)
    if not reference:
        return None
    return edit_distance(reference, hypothesis) / len(reference)
