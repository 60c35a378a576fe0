"""Inputs for the evaluation tests, made on the spot with real fonts: born-digital PDFs and rendered text."""
from __future__ import annotations

import pathlib
from typing import Sequence

from fpdf import FPDF

from evaluation.text_render import Layout, find_font

# Two pages of known text; each string is one line on the page.
PDF_PAGES = (
    ("Quarterly report for the northern region", "Revenue grew by twelve percent", "Shipping costs fell in March"),
    # A word hyphenated across lines: PDFium reports "with" + U+FFFE + "in"; the page shows "with-" / "in".
    ("Invoice 2024-03-17 totals 1,250.00 EUR", "Payment is due with-", "in thirty days"),
)
PARAGRAPHS = (
    "The committee approved the budget for next year after a long debate about road repairs.",
    "Please return the signed form before Friday so that we can schedule the delivery.",
)
PDF_FONT_PT = 14
PDF_TOP_PT = 60  # baseline of the first line
PDF_LINE_PT = 28
PDF_LEFT_PT = 40


def make_pdf(path: pathlib.Path, pages: Sequence[Sequence[str]] = PDF_PAGES, blank_pages: int = 0) -> pathlib.Path:
    """A born-digital PDF (embedded DejaVu Sans) with `pages` of lines, then `blank_pages` without text."""
    pdf = FPDF(unit="pt", format=(420, 595))
    pdf.add_font("DejaVu", fname=find_font())
    pdf.set_font("DejaVu", size=PDF_FONT_PT)
    for lines in pages:
        pdf.add_page()
        for number, line in enumerate(lines):
            pdf.text(x=PDF_LEFT_PT, y=PDF_TOP_PT + number * PDF_LINE_PT, text=line)
    for _ in range(blank_pages):
        pdf.add_page()
    pdf.output(str(path))
    return path


def small_layout() -> Layout:
    """Small but legible pages: keeps OCR engines and the tiny model fast."""
    return Layout(font_path=find_font(), font_size=24, width=640, margin=24)
