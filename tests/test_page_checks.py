"""Page checks (library/page_checks.py): orientation and blank pages on pages of real PDFs, boxes mapped back, and
the stages around them on a scripted engine (a blank page makes no engine request; a turned page is turned back).

The pages come from Debian's R manuals (r-doc-pdf, installed by scripts/setup_system.sh), which this
project did not write; benchmarks/page_checks.py measures the same on many more of them (BENCHMARKS.md).
"""
from __future__ import annotations

import io
import pathlib

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that
from PIL import Image, ImageDraw

from benchmarks import page_checks as bench
from engine.api import EngineSettings
from engine.fake import Answer, FakeEngine
from engine.registry import EngineRegistry
from library.formats import DecodeLimits, Format
from library.page_checks import (
    LINE_AXIS_SURE,
    OSD_MIN_CONFIDENCE,
    ROTATIONS,
    box_to_source,
    check_page,
    checked_grey,
    detect_rotation,
    is_blank,
    is_document,
    line_axis,
    osd_look,
    parse_osd,
    turn_upright,
)
from library.shards import ShardSettings
from schemas.records import DecodeUnit, ImageItem, ItemInfo, ItemRef, RunInfo, TaskCompletion, UnitKind
from tasks.builtin import BUILTIN_TASKS
from transforms.decode import DecodeUnits
from transforms.parse import ParseCompletions
from transforms.run_tasks import RunTasks

# Four of the manuals, the small ones: opening the 2,400-page reference manual costs more than the checks.
PDFS = tuple(pdf for pdf in bench.DEFAULT_PDFS if pdf.name in ("R-admin.pdf", "R-data.pdf", "R-intro.pdf", "R-lang.pdf"))


def _pages(count: int) -> list[tuple[pathlib.Path, int]]:
    assert len(PDFS) == 4, "Debian's r-doc-pdf is missing: run scripts/setup_system.sh"
    return bench.pick_pages(PDFS, count)


# ---------------------------------------------------------------- orientation


def test_pages_of_real_pdfs_turned_every_way_are_turned_back():
    """Four text pages of different manuals (two made scan-like), each turned 0/90/180/270: every turn found."""
    pages = _pages(4)
    measured = bench.measure_orientation(pages)
    assert measured["samples"] == 16
    assert measured["accuracy"] >= 0.98, measured["wrong"]


def _blurred_scan(seed: int) -> Image.Image:
    """R-intro.pdf's page 36 made scan-like by `seed`: 18 draws a blur of radius 0.98 (scan_like's most is 1.0)."""
    [pdf] = [pdf for pdf in PDFS if pdf.name == "R-intro.pdf"]
    return bench.scan_like(bench.render(pdf, 35), np.random.default_rng(seed), border=False)


def test_a_blurred_scan_on_its_side_that_osd_alone_leaves_is_turned_upright():
    """At ~150 dpi OSD is unsure of this blurred page (confidence under 2: the page would stay on its side);
    the second look at twice the size and the page's text lines find the turn."""
    grey = checked_grey(turn_upright(_blurred_scan(18), 90))  # lying on its side: 270 degrees turns it back
    first = osd_look(grey)
    assert first is None or first.confidence < OSD_MIN_CONFIDENCE
    found = detect_rotation(grey)
    assert found.rotation == 270, found
    assert len(found.looks) == 2 and found.line_axis <= -LINE_AXIS_SURE


def test_the_same_blurred_scan_upright_is_not_turned():
    found = detect_rotation(checked_grey(_blurred_scan(18)))
    assert found.rotation == 0, found


def test_a_clean_page_needs_one_look():
    pdf, index = _pages(1)[0]
    found = detect_rotation(checked_grey(turn_upright(bench.render(pdf, index), 180)))
    assert (found.rotation, len(found.looks), found.line_axis) == (180, 1, None), found


def test_text_lines_tell_across_from_up_and_down():
    page = checked_grey(bench.render(*_pages(1)[0]))
    assert line_axis(page) >= LINE_AXIS_SURE
    assert line_axis(turn_upright(page, 90)) <= -LINE_AXIS_SURE
    assert line_axis(turn_upright(page, 180)) >= LINE_AXIS_SURE
    assert line_axis(Image.new("L", (600, 800), 255)) == 0.0  # no ink: no lines to tell


def test_a_page_osd_cannot_read_stays_as_it_is():
    found = detect_rotation(checked_grey(Image.new("RGB", (600, 800), "white")))
    assert (found.rotation, found.confidence) == (0, None)


def test_osd_output_is_read_and_anything_else_is_no_answer():
    text = "Page number: 0\nOrientation in degrees: 270\nRotate: 90\nOrientation confidence: 18.15\nScript: Latin\n"
    assert parse_osd(text) == (90, 18.15)
    assert parse_osd("Too few characters. Skipping this page\n") is None
    assert parse_osd("Rotate: 45\nOrientation confidence: 3\n") is None


# ---------------------------------------------------------------- boxes back on the source


@pytest.mark.parametrize("rotation", ROTATIONS)
def test_a_box_found_on_the_upright_page_maps_to_the_same_source_pixels(rotation):
    source = Image.new("L", (300, 200), 255)
    ImageDraw.Draw(source).rectangle((40, 30, 99, 69), fill=0)  # x 40-99, y 30-69 inclusive
    upright = np.asarray(turn_upright(source, rotation))
    ys, xs = np.nonzero(upright == 0)
    height, width = upright.shape
    box = (ys.min() / height, xs.min() / width, (ys.max() + 1) / height, (xs.max() + 1) / width)
    ymin, xmin, ymax, xmax = box_to_source(box, rotation)
    assert (round(ymin * 200), round(xmin * 300), round(ymax * 200), round(xmax * 300)) == (30, 40, 70, 100)


def test_a_detection_on_a_turned_page_is_read_in_the_source_frame():
    """The model saw the page turned 90 degrees clockwise (300 x 200 -> 200 x 300); the row's box is on the source."""
    info = ItemInfo(ItemRef.make("/data/scan.png"), width=300, height=200, content_hash="h", rotation=90)
    # The source's rectangle (x 40-100, y 30-70) on the upright page: x 130-170 of 200, y 40-100 of 300.
    answer = '[{"box_2d": [133, 650, 333, 850], "label": "stamp"}]'
    completion = TaskCompletion(info, "detect", answer, "stop", 1, 1, 0, 0.0)
    [detection] = BUILTIN_TASKS["detect"].read(completion).parsed.detections
    assert detection.box_1000 == (133, 650, 333, 850)  # as the model emitted it, on the page it saw
    assert detection.box_px == (30, 40, 70, 100)
    assert detection.box_norm == pytest.approx((0.15, 0.1333, 0.35, 0.3333), abs=1e-3)


# ---------------------------------------------------------------- blank pages


def test_blank_scans_are_blank_and_pages_with_faint_content_are_not():
    """Scan-like pages: 12 empty, and 48 holding only a page number, one digit, one line or a faint stamp."""
    measured = bench.measure_blanks(_pages(12), 12)
    assert measured["false_blank"] == 0 and measured["precision"] == 1.0, measured["by_kind"]
    assert measured["recall"] >= 0.9, measured["by_kind"]
    assert {kind: figures["called_blank"] for kind, figures in measured["by_kind"].items() if kind != "blank_scan"} == {
        "page_number": 0, "one_digit": 0, "one_line": 0, "faint_stamp": 0}


def _jpeg(image: Image.Image, exif: Image.Exif | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **({"exif": exif} if exif is not None else {}))
    return buffer.getvalue()


def test_pages_and_scans_are_checked_photos_are_not():
    page = Image.new("RGB", (400, 300), "white")
    grey = checked_grey(page)
    camera = Image.Exif()
    camera[0x010F] = "Pixel"  # Make
    assert is_document(Format.PDF, b"", page, grey) and is_document(Format.TIFF, b"", page, grey)
    assert is_document(Format.IMAGE, _jpeg(page), page, grey)  # a scan saved as JPEG
    tinted = Image.new("RGB", (400, 300), (250, 238, 224))  # paper a scanner tinted (scan_like: up to 12 % per channel)
    assert is_document(Format.IMAGE, _jpeg(tinted), tinted, checked_grey(tinted))
    assert not is_document(Format.IMAGE, _jpeg(page, camera), page, grey)  # a camera's: a photo
    scene = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    assert not is_document(Format.IMAGE, _jpeg(scene), scene, checked_grey(scene))
    # A plain light-coloured picture is no paper: a question about it goes to the model, not the blank check.
    yellow = Image.new("RGB", (96, 64), (250, 250, 0))
    assert not is_document(Format.IMAGE, _jpeg(yellow), yellow, checked_grey(yellow))
    assert not check_page(yellow, Format.IMAGE, _jpeg(yellow), True, True)[1].blank
    # A photo is neither called blank nor turned, whatever it shows.
    assert check_page(page, Format.IMAGE, _jpeg(page, camera), True, True)[1] == check_page(page, Format.PDF, b"", False, False)[1]
    assert is_blank(grey) and check_page(page, Format.PDF, b"", True, True)[1].blank


# ---------------------------------------------------------------- the stages: decode -> engine -> parse

SETTINGS = EngineSettings(model_path="/models/fake", engine_args={}, max_in_flight=8, structured_output=True)
TASKS = [BUILTIN_TASKS["caption"], BUILTIN_TASKS["detect"]]
# On the upright page the fake model boxes its top-left tenth; on a page turned 90 degrees clockwise
# to be upright, that is the source's bottom-left corner.
UPRIGHT_BOX = '[{"box_2d": [0, 0, 100, 100], "label": "corner"}]'
_BUILT: list[FakeEngine] = []


def _engines() -> EngineRegistry:
    # Module level: Beam pickles the DoFn, and a registry (locks, engines) does not pickle.
    return _REGISTRY


def _answer(request):
    return Answer(UPRIGHT_BOX if "box" in request.instruction.lower() else "a page of a manual")


_REGISTRY = EngineRegistry(lambda settings: _BUILT.append(FakeEngine(_answer)) or _BUILT[-1], idle_s=0)


def _two_page_pdf(path: pathlib.Path) -> pathlib.Path:
    """Page 0 a blank scan, page 1 a real text page lying on its side (turned 90 degrees counter-clockwise)."""
    pdf, index = _pages(1)[0]
    text_page = bench.render(pdf, index)
    blank = bench.scan_like(Image.new("RGB", text_page.size, "white"), np.random.default_rng(3))
    sideways = turn_upright(text_page, 270)
    blank.save(path, "PDF", resolution=150.0, save_all=True, append_images=[sideways])
    return path


def test_a_blank_page_makes_no_engine_request_and_a_sideways_page_is_turned_upright(tmp_path):
    path = _two_page_pdf(tmp_path / "scan.pdf")
    unit = DecodeUnit(uri=str(path), kind=UnitKind.PDF, first_page=0, end_page=2, page_count=2)
    run = RunInfo("run-1", "model-x", "v1")
    _BUILT.clear()

    def check(rows):
        by_page = {(row["page"], row["task"]): row for row in rows}
        assert sorted(by_page) == [(0, "caption"), (0, "detect"), (1, "caption"), (1, "detect")]
        for task in ("caption", "detect"):
            blank = by_page[(0, task)]
            assert (blank["text"], blank["quality_flags"], blank["rotation"], blank["attempts"]) == ("", ["blank"], 0, 0)
            assert (blank["finish_reason"], blank["prompt_tokens"]) == (None, 0)
            turned = by_page[(1, task)]
            assert (turned["rotation"], turned["quality_flags"], turned["attempts"]) == (90, ["rotated"], 1)
        assert by_page[(0, "detect")]["detections"] == []
        [corner] = by_page[(1, "detect")]["detections"]
        width, height = by_page[(1, "detect")]["width"], by_page[(1, "detect")]["height"]
        assert width > height  # the source page lies on its side
        # The upright page's top-left tenth is the source's bottom-left: x 0-10 %, y 90-100 % of the source.
        assert corner["box_px"] == {"ymin": round(0.9 * height), "xmin": 0, "ymax": height, "xmax": round(0.1 * width)}

    limits = DecodeLimits()
    with beam.Pipeline() as pipeline:
        items = pipeline | beam.Create([unit]) | beam.ParDo(DecodeUnits(limits, ShardSettings(), TASKS))
        completions = items | beam.ParDo(RunTasks(SETTINGS, TASKS, progress_interval_s=0, engines=_engines))
        rows = completions | beam.ParDo(ParseCompletions(TASKS, run))
        assert_that(rows, check)
    [engine] = _BUILT
    assert engine.requests == len(TASKS)  # the text page's two tasks; the blank page asked nothing
    assert [len(requests) for _, requests in engine.groups] == [len(TASKS)]


def test_with_both_checks_off_every_page_goes_to_the_engine_as_it_is(tmp_path):
    path = _two_page_pdf(tmp_path / "scan.pdf")
    unit = DecodeUnit(uri=str(path), kind=UnitKind.PDF, first_page=0, end_page=2, page_count=2)
    off = DecodeLimits(skip_blank_pages=False, upright_pages=False)
    items = [item for item in DecodeUnits(off, ShardSettings(), [BUILTIN_TASKS["caption"]]).process(unit) if isinstance(item, ImageItem)]
    assert [(item.info.blank, item.info.rotation, item.info.quality_flags) for item in items] == [(False, 0, ())] * 2
    assert items[1].image.size == (items[1].info.width, items[1].info.height)  # not turned


def test_the_summary_counts_blank_and_turned_pages():
    from transforms.summary import tally_item

    def item(**checks) -> ImageItem:
        info = ItemInfo(ItemRef.make("/data/a.pdf", page=0), width=10, height=10, content_hash="h", **checks)
        return ImageItem(info, Image.new("RGB", (10, 10)), ("ocr",))

    assert [(t["blank_pages"], t["rotated_pages"]) for t in map(tally_item, [item(), item(blank=True), item(rotation=270)])] == [
        (0, 0), (1, 0), (0, 1)]
