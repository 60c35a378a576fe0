"""Answer extraction and detection parsing on real-shaped Gemma 4 answers.

The thought/answer split runs vLLM's own `gemma4_utils`; the answers below are
shaped as Gemma 4 emits them (vllm/reasoning/gemma4_utils.py docstrings, Google's
templates' thought channel `<|channel>thought\n...<channel|>`, `<turn|>` ends a turn).
"""
import json

import pytest

from tasks.answers import DetectionParseError, NoJSONFound, extract_json, parse_detections, split_answer, strip_code_fence

BOXES = '[{"box_2d": [1, 2, 30, 40], "label": "a"}]'


def test_valid_boxes_in_three_frames():
    [d] = parse_detections('[{"box_2d": [100, 200, 500, 600], "label": "cat"}]', width=1000, height=500)
    assert d.label == "cat"
    assert d.box_1000 == (100, 200, 500, 600)
    assert d.box_norm == pytest.approx((0.1, 0.2, 0.5, 0.6))
    # ymin/ymax scale with height (500), xmin/xmax with width (1000)
    assert d.box_px == (50, 200, 250, 600)


def test_empty_list_is_a_valid_answer():
    assert parse_detections("[]", 10, 10) == []


def test_swapped_corners_are_reordered():
    [d] = parse_detections('[{"box_2d": [500, 600, 100, 200], "label": "x"}]', 100, 100)
    assert d.box_1000 == (100, 200, 500, 600)


def test_out_of_range_values_are_clipped():
    [d] = parse_detections('[{"box_2d": [-20, 10, 1400, 999.6], "label": "x"}]', 100, 100)
    assert d.box_1000 == (0, 10, 1000, 1000)


def test_zero_area_boxes_are_dropped():
    assert parse_detections('[{"box_2d": [100, 100, 100, 400], "label": "line"}]', 100, 100) == []


@pytest.mark.parametrize(
    "raw, thought, answer",
    [
        # Thinking on: the thought channel with its markers, then the answer and the end of turn.
        ("<|channel>thought\nThe page shows a receipt.<channel|>TOTAL 12.50<turn|>", "The page shows a receipt.", "TOTAL 12.50"),
        # A thought block although thinking was off (large models do this at times).
        ("<|channel>thought\nhm<channel|>" + BOXES, "hm", BOXES),
        # The closing marker without the opening one (the prompt's empty channel opened it).
        ("checking the corners<channel|>" + BOXES + "<eos>", "checking the corners", BOXES),
        # The stray leading "thought\n" some Gemma 4 models emit with thinking off: no thought text.
        ("thought\nA red car on a street.", None, "A red car on a street."),
        # End-of-turn and end-of-sequence markers only.
        ("A cat.<turn|>", None, "A cat."),
        ("A cat.<eos>", None, "A cat."),
        # A thought cut off by max_tokens before its end marker is still a thought, never text.
        ("<|channel>thought\nfirst I will list every obj", "first I will list every obj", ""),
        # Several thought blocks (as Google's templates strip them all): the answer keeps what is between.
        ("<|channel>thought\na<channel|>Total:<|channel>thought\nb<channel|> 12", "a\n\nb", "Total: 12"),
        # A stray end marker later in the answer: what precedes it is thought, as vLLM reads a first one.
        ("<|channel>thought\na<channel|>noise<channel|>12", "a\n\nnoise", "12"),
        # Plain answers are untouched, including the word "thought" elsewhere.
        ("I thought so.\nYes.", None, "I thought so.\nYes."),
        # An empty thought channel (the large models' prompt with thinking off, or a model's own):
        # no thought, never the bare channel label.
        ("<|channel>thought\n<channel|>A cat.", None, "A cat."),
        ("<|channel>thought<channel|>A cat.<turn|>", None, "A cat."),
        ("<|channel>thought\n", None, ""),  # cut off right after the label
        ("<|channel>thought\nthought<channel|>A cat.", None, "A cat."),
        ("<|channel>thought\nthought about it<channel|>A cat.", "thought about it", "A cat."),
    ],
)
def test_thought_and_end_markers_are_split_off(raw, thought, answer):
    split = split_answer(raw)
    assert (split.thought, split.text) == (thought, answer)
    assert "<|channel>" not in split.text and "<channel|>" not in split.text


def test_a_thought_never_breaks_detection_json():
    raw = '<|channel>thought\nboxes: [maybe] {"x": 1}<channel|>```json\n' + BOXES + "\n```<turn|>"
    assert [d.label for d in parse_detections(split_answer(raw).text, 100, 100)] == ["a"]


def test_code_fence_around_a_whole_answer_is_stripped():
    assert strip_code_fence("```\nhello\n```") == "hello"
    assert strip_code_fence("```markdown\n# Title\nbody\n```  ") == "# Title\nbody"
    assert strip_code_fence("no fence") == "no fence"


@pytest.mark.parametrize(
    "answer",
    [
        "Here are the boxes: ```json\n" + BOXES + "\n```",
        "```json\n" + BOXES + "\n``` The image shows a single object.",
        "Objects [1 found]:\n" + BOXES + "\nDone [end].",
        'I see {"count": 1} object: ' + BOXES,
        '{"objects": ' + BOXES + "}",
    ],
)
def test_boxes_are_found_wherever_they_stand_in_the_answer(answer):
    [d] = parse_detections(answer, 100, 100)
    assert (d.label, d.box_1000) == ("a", (1, 2, 30, 40))


def test_brackets_and_braces_inside_labels_do_not_confuse_extraction():
    answer = 'Result: [{"box_2d": [1, 2, 3, 4], "label": "sign [EXIT] {lit}"}, {"box_2d": [5, 6, 7, 8], "label": "]}"}] ok'
    assert [d.label for d in parse_detections(answer, 10, 10)] == ["sign [EXIT] {lit}", "]}"]


def test_extract_json_is_general_and_takes_a_shape_filter():
    text = 'Answer (v2): {"name": "x", "tags": ["a", "b"]} and [1, 2]'
    assert extract_json(text) == {"name": "x", "tags": ["a", "b"]}
    assert extract_json(text, accept=lambda value: isinstance(value, list) and value == [1, 2]) == [1, 2]
    with pytest.raises(NoJSONFound):
        extract_json("no json here [at all")
    deep = "[" * 5000 + "]" * 5000  # the decoder's recursion limit is a skipped candidate, not a crash
    assert json.dumps(extract_json("x " + deep[:10] + " " + '{"ok": true}')) == '{"ok": true}'
    with pytest.raises(NoJSONFound):
        extract_json(deep, accept=lambda value: isinstance(value, dict))


def test_single_object_and_wrapped_list_are_accepted():
    assert len(parse_detections('{"box_2d": [1, 2, 3, 4], "label": "a"}', 10, 10)) == 1
    assert len(parse_detections('{"objects": [{"box_2d": [1, 2, 3, 4], "label": "a"}]}', 10, 10)) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json at all", "no JSON list of boxes"),
        ('[{"box_2d": [1, 2, 3], "label": "a"}]', "4 numbers"),
        ('[{"box_2d": [1, "x", 3, 4], "label": "a"}]', "not a number"),
        ('[{"box_2d": [1, 2, 3, 4], "label": 7}]', "label must be a string"),
        ('["a box"]', "expected an object"),
        ('{"a": 1}', "expected a JSON list"),
        ("Nothing to report [] here", "no JSON list of boxes"),  # an empty list counts only as the whole answer
        ('[{"box_2d": [1, 2, 3, 4], "label": "a"}, oops]', "no JSON list of boxes"),  # never silently a prefix
        ('[{"box_2d": [1, true, 3, 4], "label": "a"}]', "not a number"),
        ('[{"box_2d": [1, NaN, 3, 4], "label": "a"}]', "not finite"),
    ],
)
def test_malformed_output_raises_with_reason(text, message):
    with pytest.raises(DetectionParseError, match=message):
        parse_detections(text, 10, 10)


def test_truncated_output_keeps_complete_boxes():
    text = '[{"box_2d": [1, 2, 30, 40], "label": "a"}, {"box_2d": [5, 6, 70, 80], "label": "b"}, {"box_2d": [9, 1'
    labels = [d.label for d in parse_detections(text, 10, 10, truncated=True)]
    assert labels == ["a", "b"]
    with pytest.raises(DetectionParseError):
        parse_detections(text, 10, 10, truncated=False)


def test_truncated_output_after_prose_keeps_complete_boxes():
    text = 'Sure [here]: ```json\n[{"box_2d": [1, 2, 30, 40], "label": "a [1]"}, {"box_2d": [5, 6'
    assert [d.label for d in parse_detections(text, 10, 10, truncated=True)] == ["a [1]"]


def test_truncated_output_without_a_list_is_an_error():
    with pytest.raises(DetectionParseError, match="no JSON list"):
        parse_detections("The image shows", 10, 10, truncated=True)


def test_raw_control_characters_in_labels_are_accepted():
    # Constrained decoding (xgrammar) emits them unescaped inside strings.
    [d] = parse_detections('[{"box_2d": [1, 2, 3, 4], "label": "a\tb\x01"}]', 10, 10)
    assert d.label == "a\tb\x01"


def test_a_truncated_list_with_a_non_object_entry_is_refused():
    with pytest.raises(DetectionParseError, match="expected an object"):
        parse_detections('[{"box_2d": [1, 2, 3, 4], "label": "a"}, "stray", {"box_2d": [5', 10, 10, truncated=True)


def test_pathologically_nested_answers_are_a_parse_error_not_a_crash():
    with pytest.raises(DetectionParseError):
        parse_detections("[" * 3000 + "]" * 3000, 10, 10)
