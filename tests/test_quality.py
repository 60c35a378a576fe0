"""The quality rules (tasks/quality.py) on real OCR text and on synthetic loops; confidence; language.

tests/fixtures/ocr_text holds Tesseract 5's output (`--psm 3`) on four pages
rendered at 150 dpi from manuals Debian ships (r-doc-pdf's R-FAQ.pdf pages 3
and 6 and refman.pdf page 41, valgrind's manual page 21): real OCR text with
its noise, dot leaders and tables. The full measurement behind the thresholds
is benchmarks/loop_rule.py (BENCHMARKS.md, "Loop rule").
"""
from __future__ import annotations

import math
import pathlib

import pytest

from tasks.language import language
from tasks.quality import (
    EMPTY, LOOP_LONG_SPAN, LOOP_LONG_SPAN_COPIES, LOOP_MIN_CHARS, LOOP_MIN_COPIES, LOOPED, TRUNCATED, confidence,
    degenerate_flags, repeated_tail,
)

OCR_TEXT = {path.name: path.read_text() for path in sorted(pathlib.Path(__file__).parent.glob("fixtures/ocr_text/*.txt"))}


def test_the_fixtures_are_real_ocr_text():
    assert len(OCR_TEXT) == 4 and all(len(text) > 400 for text in OCR_TEXT.values())
    assert "......" in OCR_TEXT["R-FAQ-page2.txt"]  # dot leaders: the closest real text comes to a loop


@pytest.mark.parametrize("name", sorted(OCR_TEXT))
def test_real_ocr_text_cut_anywhere_is_no_loop(name):
    """An answer cut by max_tokens ends anywhere: no cut of a real page may read as a loop."""
    text = OCR_TEXT[name]
    for end in range(1, len(text) + 1, 3):
        assert repeated_tail(text[:end]) is None, (name, end, text[max(0, end - 80):end])
    assert degenerate_flags(text, "stop", prose=True) == ()


@pytest.mark.parametrize("name", sorted(OCR_TEXT))
@pytest.mark.parametrize("span", [
    "the ",  # a word
    "| --- ",  # a table's columns without end
    ".",  # a dot leader without end
    " ",  # whitespace padding
    "Add-on packages from CRAN\n",  # a line
    "7.1 How can I set components of a list to NULL? See the section on lists in the manual.\n",  # a long line
])
def test_a_real_page_followed_by_a_loop_is_caught_with_its_span(name, span):
    copies = max(LOOP_MIN_COPIES if len(span) < LOOP_LONG_SPAN else LOOP_LONG_SPAN_COPIES, -(-LOOP_MIN_CHARS // len(span)))
    for cut in range(len(span)):  # max_tokens ends the last copy anywhere
        loop = repeated_tail(OCR_TEXT[name] + span * copies + span[:cut])
        assert loop is not None and loop.copies >= copies and len(loop.span) == len(span), (span, cut, loop)
        assert loop.span * 2 in span * 3  # the span found is the repeated one, from some rotation
    assert degenerate_flags(OCR_TEXT[name] + span * copies, "length", prose=True) == (TRUNCATED, LOOPED)


def test_the_thresholds_hold_at_their_edges():
    prefix = OCR_TEXT["refman-page40.txt"]
    short = "abcdefghij" * 4 + "\n"  # 41 characters: a short span needs 8 copies and 320 characters
    assert repeated_tail(prefix + short * 7) is None  # 7 copies, 287 characters
    assert repeated_tail(prefix + short * 8) is not None  # 8 copies, 328 characters
    long = "The quick brown fox jumps over the lazy dog, again and again.\n"  # 62 characters: 5 copies
    assert repeated_tail(prefix + long * 4) is None
    assert repeated_tail(prefix + long * (LOOP_LONG_SPAN_COPIES + 1)) is not None
    assert repeated_tail("-" * (LOOP_MIN_CHARS - 1)) is None and repeated_tail("-" * LOOP_MIN_CHARS) is not None
    # A loop that counts ("1. 2. 3. ...") is not an exact repeat: the rule does not claim it.
    assert repeated_tail(prefix + "".join(f"item {n}\n" for n in range(200))) is None


def test_degenerate_flags():
    assert degenerate_flags("a page of text", "stop", prose=True) == ()
    assert degenerate_flags("a page of te", "length", prose=True) == (TRUNCATED,)
    assert degenerate_flags("", "stop", prose=True) == (EMPTY,)
    assert degenerate_flags(" \n ", "length", prose=True) == (TRUNCATED, EMPTY)
    assert degenerate_flags("", "stop", prose=False) == ()  # an empty answer of another kind fails (or passes) its parse
    assert degenerate_flags(" " * 500, "length", prose=True) == (TRUNCATED, LOOPED, EMPTY)


def test_confidence_is_the_geometric_mean_token_probability():
    assert confidence(None, 10) is None and confidence(-1.0, 0) is None
    assert confidence(0.0, 5) == 1.0
    assert confidence(10 * math.log(0.5), 10) == pytest.approx(0.5)
    assert confidence(math.log(0.9) * 3 + math.log(0.1), 4) == pytest.approx((0.9 ** 3 * 0.1) ** 0.25)
    assert 0.0 <= confidence(-1e6, 1) <= 1.0


def test_language_of_real_text_and_null_when_too_short():
    assert language(OCR_TEXT["valgrind_manual-page20.txt"]) == "en"
    assert language("Der schnelle braune Fuchs springt über den faulen Hund, jeden Tag.") == "de"
    assert language("Le renard brun rapide saute par-dessus le chien paresseux.") == "fr"
    assert language("Total 12.50") is None  # too few letters to tell
    assert language("") is None and language("2024-03-01 12:00 14:30") is None
