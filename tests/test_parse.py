"""Detection parsing: valid, malformed, swapped, out-of-range, empty, truncated."""
import pytest

from transforms.parse import DetectionParseError, parse_detections, strip_wrappers


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


def test_code_fence_and_thinking_are_stripped():
    text = '<|channel>thought\nlooking<channel|>```json\n[{"box_2d": [1, 2, 3, 4], "label": "a"}]\n```'
    assert [d.label for d in parse_detections(text, 10, 10)] == ["a"]
    assert strip_wrappers("```\nhello\n```") == "hello"


def test_single_object_and_wrapped_list_are_accepted():
    assert len(parse_detections('{"box_2d": [1, 2, 3, 4], "label": "a"}', 10, 10)) == 1
    assert len(parse_detections('{"objects": [{"box_2d": [1, 2, 3, 4], "label": "a"}]}', 10, 10)) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json at all", "not valid JSON"),
        ('[{"box_2d": [1, 2, 3], "label": "a"}]', "4 numbers"),
        ('[{"box_2d": [1, "x", 3, 4], "label": "a"}]', "not a number"),
        ('[{"box_2d": [1, 2, 3, 4], "label": 7}]', "label must be a string"),
        ('["a box"]', "expected an object"),
        ('{"a": 1}', "expected a JSON list"),
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


def test_truncated_output_without_a_list_is_an_error():
    with pytest.raises(DetectionParseError, match="no JSON list"):
        parse_detections("The image shows", 10, 10, truncated=True)


def test_raw_control_characters_in_labels_are_accepted():
    # Constrained decoding (xgrammar) emits them unescaped inside strings.
    [d] = parse_detections('[{"box_2d": [1, 2, 3, 4], "label": "a\tb\x01"}]', 10, 10)
    assert d.label == "a\tb\x01"
