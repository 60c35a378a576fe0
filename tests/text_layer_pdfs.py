"""Hard text-layer cases derived at test time from a real born-digital PDF nobody here wrote.

The source is R's "R Data Import/Export" manual as Debian's r-doc-pdf ships
it (pdfTeX output, Type 1 fonts with ToUnicode maps); scripts/setup_system.sh
installs it, with qpdf (to rewrite it uncompressed) and poppler-utils (an
independent extraction). Each function writes one derived PDF:

- `scanned`: pages rasterised and saved as image-only PDF pages (no layer);
- `sandwich`: those scans with an invisible (render mode 3) text layer holding
  *another* page's text, as a bad scanner OCR would;
- `without_tounicode`: the fonts' ToUnicode maps removed (PDFium falls back to glyph names);
- `private_use_tounicode`: the ToUnicode maps pointing every glyph into the private use area;
- `with_figure`: the original pages with a picture of another page's text laid over half of each;
- `two_columns`: the manual's sentences set in two columns, written interleaved across the gutter.
"""
from __future__ import annotations

import ctypes
import io
import re
import subprocess
from pathlib import Path
from typing import Sequence

import pypdfium2 as pdfium
import pypdfium2.raw as raw
from PIL import Image

SOURCE = Path("/usr/share/R/doc/manual/R-data.pdf")  # Debian r-doc-pdf


def render(path: Path, pages: Sequence[int], dpi: float = 100.0) -> list[Image.Image]:
    document = pdfium.PdfDocument(str(path))
    try:
        return [document[page].render(scale=dpi / 72.0).to_pil().convert("RGB") for page in pages]
    finally:
        document.close()


def scanned(out: Path, pages: Sequence[int]) -> Path:
    images = render(SOURCE, pages)
    images[0].save(out, "PDF", resolution=100.0, save_all=True, append_images=images[1:])
    return out


def _write(document: pdfium.PdfDocument, page: pdfium.PdfPage, font, line: str, x: float, y: float,
           invisible: bool = False) -> None:
    """One line of 9 pt text at (x, y), appended to the page's content stream."""
    obj = raw.FPDFPageObj_CreateTextObj(document.raw, font, ctypes.c_float(9.0))
    text = ctypes.create_string_buffer((line + "\0").encode("utf-16-le"))  # FPDF_WIDESTRING: UTF-16LE
    raw.FPDFText_SetText(obj, ctypes.cast(text, ctypes.POINTER(ctypes.c_ushort)))
    if invisible:
        raw.FPDFTextObj_SetTextRenderMode(obj, raw.FPDF_TEXTRENDERMODE_INVISIBLE)
    raw.FPDFPageObj_Transform(obj, 1, 0, 0, 1, x, y)
    raw.FPDFPage_InsertObject(page.raw, obj)


def two_columns(out: Path, left: Sequence[str], right: Sequence[str], header: str, footer: str) -> Path:
    """A US-letter page of two 9 pt Helvetica columns (`left` and `right`, one line each) under a full-width
    `header` and over a centred `footer`, written in the worst order for a reader: the footer first, then
    the columns' lines interleaved across the gutter (left 1, right 1, left 2, ...), the header last."""
    document = pdfium.PdfDocument.new()
    page = document.new_page(612, 792)
    font = raw.FPDFText_LoadStandardFont(document.raw, b"Helvetica")
    _write(document, page, font, footer, 300, 40)
    for number in range(max(len(left), len(right))):
        for x, lines in ((50, left), (326, right)):
            if number < len(lines):
                _write(document, page, font, lines[number], x, 720 - 11 * number)
    _write(document, page, font, header, 50, 750)
    page.gen_content()
    buffer = io.BytesIO()
    document.save(buffer)
    out.write_bytes(buffer.getvalue())
    return out


def sandwich(out: Path, pages: Sequence[int], wrong_text: str) -> Path:
    """The scans of `pages`, each with `wrong_text` as an invisible text layer over it."""
    document = pdfium.PdfDocument(str(scanned(out.with_suffix(".scan.pdf"), pages)))
    font = raw.FPDFText_LoadStandardFont(document.raw, b"Helvetica")
    for index in range(len(document)):
        page = document[index]
        height = page.get_height()
        for line_number, line in enumerate(wrong_text.splitlines()[:60]):
            _write(document, page, font, line, 40, height - 40 - 11 * line_number, invisible=True)
        page.gen_content()
    buffer = io.BytesIO()
    document.save(buffer)
    out.write_bytes(buffer.getvalue())
    return out


def _uncompressed() -> bytes:
    """The source rewritten by qpdf with its streams uncompressed, so the ToUnicode maps can be edited in place."""
    return subprocess.run(
        ["qpdf", "--qdf", "--object-streams=disable", str(SOURCE), "-"], check=True, capture_output=True
    ).stdout


def without_tounicode(out: Path) -> Path:
    # Renaming the key (same length: the cross-reference offsets stay right) hides every map from readers.
    out.write_bytes(_uncompressed().replace(b"/ToUnicode", b"/ToUnicodX"))
    return out


_CMAP = re.compile(rb"begincmap.*?endcmap", re.S)
_TARGET = re.compile(rb"(<[0-9A-Fa-f]+>\s+)<00([0-9A-Fa-f]{2})>")


def private_use_tounicode(out: Path) -> Path:
    """Every ToUnicode target U+00XX becomes U+E0XX: the same length, so the file's offsets stay right."""
    data = _CMAP.sub(lambda cmap: _TARGET.sub(rb"\1<E0\2>", cmap.group(0)), _uncompressed())
    out.write_bytes(data)
    return out


def with_figure(out: Path, pages: Sequence[int], figure_page: int) -> Path:
    """Each of `pages` with a picture of `figure_page`'s text over its lower half: text the layer lacks."""
    [picture] = render(SOURCE, [figure_page], dpi=110.0)
    picture = picture.crop((0, picture.height // 6, picture.width, picture.height // 2))
    document = pdfium.PdfDocument(str(SOURCE))
    keep = pdfium.PdfDocument.new()
    keep.import_pages(document, list(pages))
    for index in range(len(keep)):
        page = keep[index]
        width, height = page.get_size()
        image = pdfium.PdfImage.new(keep)
        image.set_bitmap(pdfium.PdfBitmap.from_pil(picture))
        shown_height = width * picture.height / picture.width
        image.set_matrix(pdfium.PdfMatrix().scale(width, shown_height).translate(0, 0))
        page.insert_obj(image)
        page.gen_content()
    buffer = io.BytesIO()
    keep.save(buffer)
    out.write_bytes(buffer.getvalue())
    return out


def pdftotext(path: Path, page: int) -> str:
    """poppler's extraction of one page (0-based), in its reading order: the independent reference."""
    return subprocess.run(
        ["pdftotext", "-f", str(page + 1), "-l", str(page + 1), "-enc", "UTF-8", str(path), "-"],
        check=True, capture_output=True, text=True,
    ).stdout
