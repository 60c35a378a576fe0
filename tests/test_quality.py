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

from tasks.language import MIN_PROBABILITY, best_guess, iso_639_1, language, letters
from tasks.quality import (
    EMPTY, LOOP_LONG_SPAN, LOOP_LONG_SPAN_COPIES, LOOP_MIN_CHARS, LOOP_MIN_COPIES, LOOPED, TRUNCATED, confidence,
    degenerate_flags, field_confidence, repeated_tail,
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
    assert language("Total 12.50") is None  # too little to tell: the best language scores 0.03
    assert language("") is None and language("2024-03-01 12:00 14:30") is None  # no letter


# Real translated messages of Debian's gettext catalogs (/usr/share/locale/LANG/LC_MESSAGES/DOMAIN.mo; the
# measurement behind the rule: benchmarks/language.py, BENCHMARKS.md "Language").
SHORT_AND_SURE = [  # under 16 letters, yet py3langid's best language scores 0.9 or more, and is right
    ("zh", "不存在特定于模块的数据"),  # zh_CN, Linux-PAM
    ("ja", "認証トークンの有効期限切れです"),  # ja, Linux-PAM
    ("ru", "Есть новая почта."),  # ru, Linux-PAM
    ("de", "Auszeit erreicht"),  # de, avahi
    ("fr", "Fenêtre changée"),  # fr, bash
    ("zh", "比較兩個版本號。"),  # zh_TW, appstream: py3langid says "yue" (Cantonese) at 0.75, a member of zh
]
CLOSE_PAIR_COIN_TOSSES = [  # 20+ letters, yet scored 0.5-0.7 and given the neighbouring language
    ("hr", "Potreban je naziv repozitorija, parametar i vrijednost"),  # hr, PackageKit: "bs" at 0.64
    ("id", "Otentikasi servis tidak mendapat kredential pengguna"),  # id, Linux-PAM: "ms" at 0.58
    ("cs", "Vložte, prosím, správný nosič"),  # cs, PackageKit: "sk" at 0.52
    ("pt", "A conta do utilizador expirou"),  # pt, Linux-PAM: "gl" at 0.50
]


@pytest.mark.parametrize("code, text", SHORT_AND_SURE)
def test_a_short_answer_is_named_when_the_identifier_is_sure(code, text):
    assert letters(text) < 16 and language(text) == code


def test_labels_without_a_two_letter_code_become_their_macrolanguages_or_null():
    assert [iso_639_1(code) for code in ("de", "yue", "wuu", "arz", "ary", "pcm", "zxx")] == ["de", "zh", "zh", "ar", "ar", None, None]


@pytest.mark.parametrize("code, text", CLOSE_PAIR_COIN_TOSSES)
def test_a_coin_toss_between_neighbouring_languages_is_null_not_the_wrong_one(code, text):
    guess, probability = best_guess(text)
    assert letters(text) >= 20 and guess != code and 0.5 <= probability < MIN_PROBABILITY
    assert language(text) is None


# Per-field confidence of a json answer (tasks.quality.field_confidence).

FENCED = 'Here it is:\n```json\n{"total": 12.5, "vendor": "ACME, Inc. {1}", "lines": [{"qty": 2}], "paid": null}\n```'
FENCED_DATA = '{"total":12.5,"vendor":"ACME, Inc. {1}","lines":[{"qty":2}],"paid":null}'


def scripted_tokens(text: str, unsure: str = "", logprob: float = -0.05, unsure_logprob: float = -3.0) -> list[tuple[str, float]]:
    """`text` in pieces of up to 3 characters; a piece holding part of `unsure` gets `unsure_logprob`."""
    at = text.find(unsure) if unsure else -1
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + 3)
        hit = at != -1 and start < at + len(unsure) and end > at
        pieces.append((text[start:end], unsure_logprob if hit else logprob))
        start = end
    return pieces


def test_field_confidence_scores_each_value_by_its_own_tokens():
    tokens = scripted_tokens(FENCED, unsure="ACME")
    figures = dict(field_confidence(tokens, FENCED, FENCED_DATA))
    assert list(figures) == ["total", "vendor", "lines", "paid"]  # as written
    assert figures["total"] == pytest.approx(math.exp(-0.05)) and figures["paid"] == pytest.approx(math.exp(-0.05))
    assert figures["lines"] == pytest.approx(math.exp(-0.05))  # a nested value: its own tokens only
    assert figures["vendor"] < 0.5 < figures["total"]  # the unsure tokens sit in the vendor's value alone
    # The whole answer's confidence averages them away.
    whole = confidence(sum(lp for _, lp in tokens), len(tokens))
    assert figures["vendor"] < whole < figures["total"]


def test_field_confidence_allows_the_stop_token_after_the_text_and_finds_the_document_past_decoys():
    text = 'Options {a} and {"x": 1}, chosen: {"total": 3, "note": "x"}'
    tokens = scripted_tokens(text, unsure='"x"}') + [("<turn|>", -0.01)]  # vLLM leaves the stop token out of the text
    figures = dict(field_confidence(tokens, text, '{"total":3,"note":"x"}'))
    assert figures["total"] == pytest.approx(math.exp(-0.05)) and figures["note"] < 0.5


@pytest.mark.parametrize("tokens, text, data", [
    (None, FENCED, FENCED_DATA),  # no log-probabilities asked for
    ([("Here", -0.1)], FENCED, FENCED_DATA),  # tokens that do not spell the text
    (scripted_tokens("[1, 2]"), "[1, 2]", "[1,2]"),  # not an object: no fields
    (scripted_tokens('{"a": [1, 2'), '{"a": [1, 2', '{"a":[1]}'),  # salvaged: not in the text as written
    (scripted_tokens(FENCED), FENCED, None),  # no document
])
def test_field_confidence_is_none_where_it_cannot_be_attributed(tokens, text, data):
    assert field_confidence(tokens, text, data) is None


def test_field_confidence_with_the_tiny_checkpoints_tokenizer():
    """The token texts vLLM's logprobs processor decodes (one token at a time, as the engine emits them),
    read by engine.local.sampled_tokens, spell the answer: "ß" is byte-fallback pieces in this tokenizer."""
    import numpy as np
    from transformers import AutoTokenizer
    from vllm.logprobs import create_sample_logprobs
    from vllm.v1.engine import EngineCoreOutput
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsLists

    from engine.local import sampled_tokens
    from tiny_model.checkpoint import ensure_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_checkpoint("tiny-e2b")))
    text = '{"title": "Straße 12", "total": 12.5}'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode())  # not one token per byte: pieces of several characters
    value_at = text.index("12.5")
    # As SamplingParams(logprobs=0, flat_logprobs=True) has vLLM build it (LogprobsProcessor.from_new_request).
    processor = LogprobsProcessor(tokenizer=tokenizer, logprobs=create_sample_logprobs(True), prompt_logprobs=None,
                                  cumulative_logprob=0.0, num_logprobs=0, num_prompt_logprobs=None)
    for index, token in enumerate(ids):
        end = len(tokenizer.decode(ids[: index + 1]))
        start = len(tokenizer.decode(ids[:index]))
        unsure = end > value_at and start < value_at + 4  # the tokens of the total's value
        step = LogprobsLists(np.array([[token]]), np.array([[-2.0 if unsure else -0.01]], dtype=np.float32), np.array([1]))
        processor.update_from_output(EngineCoreOutput(request_id="r", new_token_ids=[token], new_logprobs=step))
    tokens = sampled_tokens(processor.logprobs)
    assert "".join(piece for piece, _ in tokens) == text, tokens
    figures = dict(field_confidence(tokens, text, '{"title":"Straße 12","total":12.5}'))
    assert figures == {"title": pytest.approx(math.exp(-0.01)), "total": pytest.approx(math.exp(-2.0))}
