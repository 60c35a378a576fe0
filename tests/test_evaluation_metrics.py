"""Metrics: perfect answers score perfectly, known damage moves scores by the amount computed by hand."""
from __future__ import annotations

import pytest

from evaluation.metrics import (
    LabeledBox,
    caption_chrf,
    detection_scores,
    markdown_to_text,
    normalize_text,
    text_errors,
    total_text_errors,
)

SENTENCE = "the quick brown fox jumps"  # 25 characters, 5 words


@pytest.mark.parametrize(
    "markdown, text",
    [
        ("# The **quick** _brown_ fox\n\n- jumps", "The quick brown fox jumps"),
        ("| item | price |\n|:---|---:|\n| tax | $4.50 |", "item price tax $4.50"),  # a dollar amount is no math
        ('<table><tr><td rowspan="2">A &amp; B</td><td>x</td></tr></table>', "A & B x"),
        ("$$E = mc^2$$ and \\(a_1\\) and $x$", "E = mc^2 and a_1 and x"),
        ("See [the table](#t) ![chart](c.png) 1. first\n\n---\n```\ncode\n```", "See the table 1. first code"),
        ("snake_case stays, 2 * 3 = 6, \\*literal\\*", "snake_case stays, 2 * 3 = 6, *literal*"),
    ],
)
def test_markdown_loses_its_markup_and_keeps_the_text(markdown, text):
    assert normalize_text(markdown_to_text(markdown)) == text


def test_perfect_transcription_scores_zero():
    errors = text_errors(SENTENCE, SENTENCE)
    assert (errors.cer, errors.wer) == (0.0, 0.0)


def test_layout_and_ligatures_are_not_reading_errors():
    # A PDF text layer breaks lines and uses the "ﬁ" ligature where a reader writes "fi".
    assert text_errors("ﬁve  apples\nand pears", "five apples and pears").cer == 0.0
    assert normalize_text("  a\n\tb  ") == "a b"


def test_dropped_word():
    # "the quick fox jumps" lacks "brown " = 6 deleted characters of 25 -> CER 6/25;
    # 1 deleted word of 5 -> WER 1/5.
    errors = text_errors(SENTENCE, "the quick fox jumps")
    assert errors.cer == pytest.approx(6 / 25)
    assert errors.wer == pytest.approx(1 / 5)


def test_substituted_character():
    # "quick" -> "quack": 1 substituted character of 25; 1 wrong word of 5.
    errors = text_errors(SENTENCE, "the quack brown fox jumps")
    assert (errors.cer, errors.wer) == (pytest.approx(1 / 25), pytest.approx(1 / 5))


def test_empty_answer_deletes_everything_and_insertions_count_past_one():
    assert text_errors(SENTENCE, "").cer == 1.0
    # 25 reference characters + 26 inserted (" " + the sentence again) -> CER 26/25.
    assert text_errors(SENTENCE, f"{SENTENCE} {SENTENCE}").cer == pytest.approx(26 / 25)


def test_corpus_rate_weights_items_by_length():
    # Item 1: 6 edits / 25 chars; item 2: 1 edit / 4 chars ("abcd" vs "abce").
    # Corpus CER = 7 / 29 (not the mean of 0.24 and 0.25).
    total = total_text_errors([text_errors(SENTENCE, "the quick fox jumps"), text_errors("abcd", "abce")])
    assert total.cer == pytest.approx(7 / 29)
    assert total.wer == pytest.approx(2 / 6)
    assert total_text_errors([]) is None


def test_empty_reference_is_refused():
    with pytest.raises(ValueError):
        text_errors("  \n", "anything")


LINE_A = LabeledBox("text", (0.10, 0.10, 0.20, 0.50))
LINE_B = LabeledBox("text", (0.30, 0.10, 0.40, 0.50))


def test_perfect_boxes_score_one():
    truth = {"a": [LINE_A, LINE_B], "b": [LINE_A]}
    scores = detection_scores(truth, truth)
    assert scores.overall.map == pytest.approx(1.0)
    assert scores.overall.ap50 == pytest.approx(1.0)
    assert all(item.map == pytest.approx(1.0) for item in scores.per_item.values())


def test_shifted_box_loses_the_strict_thresholds_only():
    # Shifted down by 0.02 on a 0.10-high box: overlap 0.08 x 0.40, union 0.12 x 0.40 -> IoU 2/3.
    # It matches at IoU 0.50, 0.55, 0.60, 0.65 (4 of the 10 COCO thresholds) -> mAP 0.4, AP50 1.
    shifted = LabeledBox("text", (0.12, 0.10, 0.22, 0.50))
    scores = detection_scores({"a": [LINE_A]}, {"a": [shifted]})
    assert scores.overall.ap50 == pytest.approx(1.0)
    assert scores.overall.map == pytest.approx(0.4)


def test_dropped_box_halves_recall():
    # 1 of 2 boxes found, precision 1: COCO's 101-point curve is 1 at recall 0.00..0.50
    # (51 points) and 0 above -> AP = 51/101 at every threshold.
    scores = detection_scores({"a": [LINE_A, LINE_B]}, {"a": [LINE_A]})
    assert scores.overall.map == pytest.approx(51 / 101)
    assert scores.overall.ap50 == pytest.approx(51 / 101)


def test_missing_item_counts_as_no_boxes_and_extra_items_are_ignored():
    # Item "b" unanswered: 1 of 2 boxes overall found -> 51/101, as above; "c" has no reference.
    scores = detection_scores({"a": [LINE_A], "b": [LINE_B]}, {"a": [LINE_A], "c": [LINE_B]})
    assert scores.overall.map == pytest.approx(51 / 101)
    assert scores.per_item["b"].map == 0.0 and "c" not in scores.per_item


def test_labels_must_match_unless_ignored():
    truth, predicted = {"a": [LINE_A]}, {"a": [LabeledBox("paragraph", LINE_A.box)]}
    assert detection_scores(truth, predicted).overall.map == 0.0
    assert detection_scores(truth, predicted, match_labels=False).overall.map == pytest.approx(1.0)


def test_dense_pages_are_not_capped_at_100_boxes():
    # 150 word boxes, all found. With COCO's default 100-detection cap recall would stop at
    # 100/150 and AP at ~0.67; the cap is raised to the densest item.
    words = [LabeledBox("text", (row / 15, col / 10, (row + 0.8) / 15, (col + 0.8) / 10)) for row in range(15) for col in range(10)]
    scores = detection_scores({"page": words}, {"page": words})
    assert scores.overall.map == pytest.approx(1.0)


def test_caption_chrf():
    assert caption_chrf("a red car parked on a street", ["a red car parked on a street"]) == pytest.approx(100.0)
    close = caption_chrf("a red car parked in the street", ["a red car parked on a street"])
    far = caption_chrf("two dogs playing with a ball", ["a red car parked on a street"])
    assert 100.0 > close > far >= 0.0
    # Several acceptable references: the best one counts.
    assert caption_chrf("a red car", ["a photo of a cat", "a red car"]) == pytest.approx(100.0)
    assert caption_chrf("", ["a red car"]) == 0.0
