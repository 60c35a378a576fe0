"""Property-based tests: the detection parser and the decode guards never fail in an unplanned way."""
from __future__ import annotations

import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from library.formats import DecodeLimits, to_rgb
from library.shards import ShardSettings
from schemas.records import DecodeUnit, ErrorRecord, ImageItem, SourceFile, Stage
from tasks.answers import DetectionParseError, parse_detections, split_answer
from transforms.decode import DecodeUnits, PlanUnits

numbers = st.one_of(st.integers(-5000, 5000), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5))
boxes = st.lists(numbers, min_size=0, max_size=6)
entries = st.one_of(
    st.fixed_dictionaries({"box_2d": boxes, "label": st.one_of(st.text(max_size=20), st.integers(), st.none())}),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    st.text(max_size=10),
    st.integers(),
)
payloads = st.one_of(st.lists(entries, max_size=8), entries)


# Completions as the engine decodes them (special tokens kept): any mix of text and Gemma 4's markers.
completions = st.lists(
    st.one_of(st.sampled_from(["<|channel>", "<channel|>", "thought\n", "<turn|>", "<eos>", "\n"]), st.text(max_size=6)),
    max_size=12,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(raw=completions)
def test_no_thought_marker_ever_reaches_the_answer(raw):
    answer = split_answer(raw)
    assert "<|channel>" not in answer.text and "<channel|>" not in answer.text
    assert answer.thought is None or answer.thought  # None, never an empty thought


def check_detections(detections, width, height):
    for d in detections:
        ymin, xmin, ymax, xmax = d.box_1000
        assert 0 <= ymin < ymax <= 1000 and 0 <= xmin < xmax <= 1000
        assert all(0.0 <= v <= 1.0 for v in d.box_norm)
        py0, px0, py1, px1 = d.box_px
        assert 0 <= py0 <= py1 <= height and 0 <= px0 <= px1 <= width


@settings(max_examples=300, deadline=None)
@given(payload=payloads, width=st.integers(1, 5000), height=st.integers(1, 5000), cut=st.integers(0, 400), truncated=st.booleans())
def test_parser_returns_valid_boxes_or_raises_its_own_error(payload, width, height, cut, truncated):
    text = json.dumps(payload, allow_nan=True)
    if truncated:
        text = text[: max(0, len(text) - cut)]
    try:
        detections = parse_detections(text, width, height, truncated=truncated)
    except DetectionParseError:
        return
    check_detections(detections, width, height)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200), truncated=st.booleans())
def test_parser_on_arbitrary_text(text, truncated):
    try:
        check_detections(parse_detections(text, 640, 480, truncated=truncated), 640, 480)
    except DetectionParseError:
        pass


def decode_file(path: str, limits: DecodeLimits):
    """Plan + decode one file; every output must be an item or an error record."""
    outputs = []
    for planned in PlanUnits(limits, ShardSettings()).process(SourceFile(path, len(open(path, "rb").read()))):
        if isinstance(planned, DecodeUnit):
            outputs.extend(DecodeUnits(limits, ShardSettings()).process(planned))
        else:
            outputs.append(planned)
    for output in outputs:
        assert isinstance(output, ImageItem) or isinstance(output.value, ErrorRecord)
    return outputs


SMALL = DecodeLimits(max_image_pixels=2_000_000, max_pages=20, max_side=256)
magic_prefixes = st.sampled_from([b"", b"%PDF-1.4\n", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"GIF89a", b"PAR1", b"\x1f\x8b", b"RIFF\x00\x00\x00\x00WEBP"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=magic_prefixes, body=st.binary(max_size=2048))
def test_decode_guards_turn_any_bytes_into_items_or_error_rows(tmp_path, prefix, body):
    path = tmp_path / "blob"
    path.write_bytes(prefix + body)
    decode_file(str(path), SMALL)


def encoded(mode: str, size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, fmt)
    return buffer.getvalue()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]),
    width=st.integers(1, 3000),
    height=st.integers(1, 3000),
    cut=st.one_of(st.none(), st.integers(1, 200)),
)
def test_images_of_any_mode_and_size_decode_or_fail_cleanly(tmp_path, mode, width, height, cut):
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    data = encoded(mode, (width, height), fmt)
    if cut is not None:
        data = data[: max(1, len(data) - cut)]
    path = tmp_path / "image"
    path.write_bytes(data)
    for output in decode_file(str(path), SMALL):
        if isinstance(output, ImageItem):
            assert output.image.mode == "RGB"
            assert max(output.image.size) <= SMALL.max_side
            assert (output.info.width, output.info.height) == (width, height)
            assert width * height <= SMALL.max_image_pixels
        else:
            assert output.value.stage in (Stage.PLAN, Stage.DECODE)


@given(mode=st.sampled_from(["1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr", "HSV", "LAB"]))
def test_to_rgb_handles_every_mode(mode):
    image = Image.new(mode, (7, 5))
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == (7, 5)
