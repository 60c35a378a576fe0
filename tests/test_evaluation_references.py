"""Reference sets: the format round-trips, and the builders' text and boxes are true to the pixels."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from evaluation.pdf_references import pdf_references
from evaluation.storage import match_sources, read_references, write_references
from evaluation.text_render import Degradation, degrade, paragraphs, reference_boxes, render_paragraph, write_rendered_set
from library.formats import DecodeLimits, render_pdf_page
from pipelines import references as references_cli
from schemas.records import ItemRef
from schemas.references import ReferenceBox, InvalidReference, ReferenceItem, reference_from_row
from tests.evaluation_data import PARAGRAPHS, PDF_PAGES, make_pdf, small_layout

DARK = 128  # grey level below which a pixel is ink


def ink(image, box) -> int:
    """Dark pixels inside a 0-1 (ymin, xmin, ymax, xmax) box of `image`."""
    ymin, xmin, ymax, xmax = box
    width, height = image.size
    crop = np.asarray(image.convert("L"))[int(ymin * height):int(np.ceil(ymax * height)), int(xmin * width):int(np.ceil(xmax * width))]
    return int((crop < DARK).sum())


def test_reference_format_round_trips_through_parquet_and_jsonl(tmp_path):
    item = ReferenceItem(
        ref=ItemRef.make("gs://bucket/a.pdf", page=2), width=100, height=200, text="hello",
        boxes=(ReferenceBox("text", (0.1, 0.2, 0.3, 0.4), "hello"),), captions=("a page",), origin="manual",
        answers={"invoice": {"number": "A-7", "total": 12.5}, "answer": "four"},
    )
    only_text = ReferenceItem(ref=ItemRef.make("b.png"), text="just text")
    for name in ("refs.parquet", "refs.jsonl"):
        write_references(str(tmp_path / name), [item, only_text])
        loaded = read_references(str(tmp_path / name))
        assert loaded[1] == only_text
        assert loaded[0].ref == item.ref and loaded[0].captions == item.captions and loaded[0].text == "hello"
        assert loaded[0].answers == item.answers
        assert loaded[0].boxes[0].box == pytest.approx(item.boxes[0].box)  # float32 in Parquet


def test_hand_written_jsonl_needs_only_the_key_and_some_references(tmp_path):
    lines = [
        {"source_uri": "scans/a.tiff", "page": 1, "captions": ["a fax cover sheet"]},
        {"source_uri": "shard.tar", "member": "0001", "boxes": [{"label": "dog", "box": [0.1, 0.1, 0.5, 0.6]}]},
    ]
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    first, second = read_references(str(tmp_path / "refs.jsonl"))
    # Relative paths mean what they mean on the pipeline's command line: the ids are canonical (absolute).
    assert first.ref.item_id == os.path.abspath("scans/a.tiff") + "#page=1" and first.text is None and first.boxes is None
    assert second.ref.item_id == os.path.abspath("shard.tar") + "#member=0001" and second.boxes[0].box == (0.1, 0.1, 0.5, 0.6)


@pytest.mark.parametrize(
    "row",
    [
        {"source_uri": "a.png", "boxes": [{"label": "x", "box": [0.5, 0.1, 0.2, 0.6]}]},  # ymin > ymax
        {"source_uri": "a.png", "boxes": [{"label": "x", "box": [10, 10, 500, 600]}]},  # pixels, not 0-1
        {"source_uri": "a.png", "item_id": "b.png"},  # key disagrees with the URI
        {"page": 1, "text": "no uri"},
        {"source_uri": "a.png", "captions": "one caption, not a list"},
        {"source_uri": "a.png", "answers": ["four"]},  # task -> answer, not a list
        {"source_uri": "a.png", "answers": "{not json"},
    ],
)
def test_invalid_reference_rows_are_refused(row):
    with pytest.raises(InvalidReference):
        reference_from_row(row)


def test_a_duplicated_item_is_refused(tmp_path):
    (tmp_path / "refs.jsonl").write_text('{"source_uri": "a.png", "text": "x"}\n' * 2)
    with pytest.raises(ValueError, match="more than once"):
        read_references(str(tmp_path / "refs.jsonl"))


@pytest.fixture(scope="module")
def pdf_path(tmp_path_factory):
    return make_pdf(tmp_path_factory.mktemp("pdf") / "report.pdf", blank_pages=1)


def test_pdf_text_matches_the_text_layer_and_pages_without_text_are_skipped(pdf_path):
    items = list(pdf_references(match_sources([str(pdf_path)]), DecodeLimits(), "line"))
    assert [item.ref.item_id for item in items] == [f"{pdf_path}#page=0", f"{pdf_path}#page=1"]  # page 2 is blank
    for item, lines in zip(items, PDF_PAGES):
        assert item.text == "\n".join(lines)
        assert [box.text for box in item.boxes] == list(lines)
        assert item.origin == "pdf-text-layer:line"


def test_pdf_boxes_land_on_the_words_of_the_rendered_page(pdf_path):
    limits = DecodeLimits(pdf_dpi=100)
    [first, _] = pdf_references(match_sources([str(pdf_path)]), limits, "word")
    page = render_pdf_page(pdf_path.read_bytes(), 0, limits)
    assert (first.width, first.height) == page.size
    words = first.boxes
    assert [w.text for w in words] == " ".join(PDF_PAGES[0]).split()
    first_count, second_count = (len(line.split()) for line in PDF_PAGES[0][:2])
    first_line, second_line = words[:first_count], words[first_count:first_count + second_count]
    line_end = max(w.box[3] for w in first_line)
    pad_y, pad_x = 2 / page.height, 2 / page.width  # two pixels: less than the gap between words
    for word in words:
        ymin, xmin, ymax, xmax = word.box
        inside = ink(page, word.box)
        # The box holds ink, and (nearly) all of its word's ink: growing it by 2 px adds little.
        assert inside > 10, word
        assert ink(page, (ymin - pad_y, xmin - pad_x, ymax + pad_y, xmax + pad_x)) <= 1.1 * inside, word
    for word in first_line:
        # Tight boxes: the same box moved past the line's end holds no ink.
        ymin, xmin, ymax, xmax = word.box
        assert ink(page, (ymin, line_end + 0.01, ymax, line_end + 0.01 + (xmax - xmin))) == 0, word
    # Between the first line's lowest glyph and the second line's highest there is no ink.
    gap = (max(w.box[2] for w in first_line) + 0.002, 0.0, min(w.box[0] for w in second_line) - 0.002, 1.0)
    assert ink(page, gap) == 0


def test_from_pdf_command(pdf_path, tmp_path, capsys):
    references_cli.main(["from-pdf", "--input", str(pdf_path.parent / "*.pdf"), "--output", str(tmp_path / "refs.jsonl")])
    assert len(read_references(str(tmp_path / "refs.jsonl"))) == 2
    assert "2 reference items (6 text boxes)" in capsys.readouterr().out


def test_rendered_text_and_boxes_are_exact():
    rendered = render_paragraph(PARAGRAPHS[0], small_layout())
    assert rendered.text.split() == PARAGRAPHS[0].split() and "\n" in rendered.text  # wrapped
    for box in reference_boxes(rendered, "word"):
        assert ink(rendered.image, box.box) > 10, box
    lines = reference_boxes(rendered, "line")
    assert [box.text for box in lines] == rendered.text.split("\n")
    between = (lines[0].box[2] + 0.01, 0.0, lines[1].box[0] - 0.01, 1.0)
    assert ink(rendered.image, between) == 0


def test_rotation_moves_the_boxes_with_the_words():
    clean = render_paragraph(PARAGRAPHS[1], small_layout())
    rotated = degrade(clean, Degradation.parse("rotate=4"), np.random.default_rng(0))
    assert rotated.image.size != clean.image.size  # the page grew to keep its corners
    for box in reference_boxes(rotated, "word"):
        assert ink(rotated.image, box.box) > 10, box
    # Axis-aligned boxes of rotated words contain all of each word's ink: the page's dark
    # pixels all fall inside some word box.
    dark = np.asarray(rotated.image.convert("L")) < DARK
    covered = np.zeros_like(dark)
    height, width = dark.shape
    for box in reference_boxes(rotated, "word"):
        ymin, xmin, ymax, xmax = box.box
        covered[int(ymin * height):int(np.ceil(ymax * height)) + 1, int(xmin * width):int(np.ceil(xmax * width)) + 1] = True
    assert (dark & ~covered).sum() <= 0.01 * dark.sum()


def test_degradations_are_reproducible_and_named():
    degradation = Degradation.parse("blur=1,noise=12,jpeg=30")
    assert degradation.name == "blur1-noise12-jpeg30" and Degradation.parse("clean").name == "clean"
    clean = render_paragraph("Seeded noise", small_layout())
    first = degrade(clean, degradation, np.random.default_rng(7)).image
    again = degrade(clean, degradation, np.random.default_rng(7)).image
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(clean.image))
    with pytest.raises(ValueError):
        Degradation.parse("smudge=3")


def test_render_text_command_writes_images_and_references(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(f"{PARAGRAPHS[0]}\n\n\n{PARAGRAPHS[1][:40]}\n{PARAGRAPHS[1][40:]}\n")
    assert paragraphs((tmp_path / "corpus.txt").read_text()) == [PARAGRAPHS[0], PARAGRAPHS[1][:40] + " " + PARAGRAPHS[1][40:]]
    references_cli.main([
        "render-text", "--text", str(tmp_path / "corpus.txt"), "--output", str(tmp_path / "set"),
        "--degrade", "clean", "--degrade", "rotate=2,noise=6", "--font_size", "20", "--width", "500",
    ])
    items = read_references(str(tmp_path / "set" / "references.parquet"))
    names = sorted(item.ref.source_uri.rsplit("/", 1)[1] for item in items)
    assert names == ["text0000-clean.png", "text0000-rotate2-noise6.png", "text0001-clean.png", "text0001-rotate2-noise6.png"]
    assert all((tmp_path / "set" / name).is_file() for name in names)
    assert "4 reference items" in capsys.readouterr().out


def test_write_rendered_set_keys_items_like_the_pipeline(tmp_path):
    [item] = write_rendered_set(["One line"], str(tmp_path), small_layout())
    [source] = match_sources([str(tmp_path / "*.png")])
    assert item.ref == ItemRef.make(source.uri) and item.origin == "render-text:clean"
