"""Born-digital PDFs: text-layer verdicts on real and derived pages, the routes of --text_layer, the rows' columns.

The pages are R's "R Data Import/Export" manual (Debian r-doc-pdf) and the
hard cases derived from it at test time (tests/text_layer_pdfs.py). The
engine is the scripted one (engine/fake.py): what is checked is which pages
reach it and what the rows say, not what a model reads.
"""
from __future__ import annotations

import io
import random
import re
import statistics
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pypdfium2 as pdfium
import pytest

from engine.api import EngineRequest
from engine.fake import Answer
from library.formats import DecodeLimits
from library.reading_order import reading_order
from library.metadata import ItemValues
from library.shards import ShardSettings
from library.text_layer import Verdict, comparable, disagreement, edit_distance, read_layers
from schemas.records import ImageItem, LayerAnswers, RunInfo, SourceFile, TaskCompletion
from schemas.tables import RESULTS_SCHEMA
from tasks.builtin import BUILTIN_TASKS
from tasks.task import TaskFingerprints, layer_fingerprint
from tasks.task_file import TaskFileError, parse_task_file
from tasks.text_layer import TextLayerSettings, audited, route
from tests import text_layer_pdfs as derive
from tests.test_run_tasks import SETTINGS, DrivenStage, _values
from transforms.decode import DecodeUnits, PlanUnits
from transforms.incremental import HashUnits
from transforms.parse import ParseCompletions
from transforms.run_tasks import image_key

OCR, CAPTION, MARKDOWN = BUILTIN_TASKS["ocr"], BUILTIN_TASKS["caption"], BUILTIN_TASKS["markdown"]
TRUSTED_PAGES = (5, 10, 20)  # prose pages of the manual
# The mixed document: three trusted pages, then one page of each hard case.
EXPECTED = ["trusted", "trusted", "trusted", "none", "ocr_layer", "garbled", "partial"]
RUN = RunInfo(run_id="r", model_id="m", prompt_version="p")


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("text-layer")
    [other_page] = read_layers(derive.SOURCE.read_bytes(), [12])
    return {
        "scanned": derive.scanned(folder / "scanned.pdf", [6]),
        "sandwich": derive.sandwich(folder / "sandwich.pdf", [7], other_page.text),
        "private_use": derive.private_use_tounicode(folder / "private_use.pdf"),
        "without_tounicode": derive.without_tounicode(folder / "without_tounicode.pdf"),
        "figure": derive.with_figure(folder / "figure.pdf", [8], figure_page=12),
    }


@pytest.fixture(scope="module")
def mixed(cases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PDF holding a page of each kind, in the order of EXPECTED."""
    document = pdfium.PdfDocument.new()
    for path, pages in ((derive.SOURCE, list(TRUSTED_PAGES)), (cases["scanned"], [0]), (cases["sandwich"], [0]),
                        (cases["private_use"], [9]), (cases["figure"], [0])):
        document.import_pages(pdfium.PdfDocument(str(path)), pages)
    buffer = io.BytesIO()
    document.save(buffer)
    path = tmp_path_factory.mktemp("mixed") / "mixed.pdf"
    path.write_bytes(buffer.getvalue())
    return path


def verdicts(path: Path) -> list[str]:
    data = path.read_bytes()
    return [layer.verdict.value for layer in read_layers(data, range(len(pdfium.PdfDocument(data))))]


def test_each_derived_case_gets_its_verdict(cases: dict[str, Path], mixed: Path):
    assert set(verdicts(derive.SOURCE)) == {"trusted"}  # pdfTeX output, every page
    assert verdicts(cases["scanned"]) == ["none"]
    assert verdicts(cases["sandwich"]) == ["ocr_layer"]
    assert set(verdicts(cases["private_use"])) == {"garbled"}
    assert verdicts(cases["figure"]) == ["partial"]
    assert verdicts(mixed) == EXPECTED


def test_without_tounicode_maps_pdfium_reads_type1_glyph_names_and_the_page_stays_trusted(cases: dict[str, Path]):
    # Type 1 fonts name their glyphs: PDFium maps the names to Unicode when no ToUnicode map is left, so
    # the layer is still right, and the verdict says so from the characters, not from the file's structure.
    pages = list(range(0, 41, 5))
    original = read_layers(derive.SOURCE.read_bytes(), pages)
    stripped = read_layers(cases["without_tounicode"].read_bytes(), pages)
    assert b"/ToUnicode" not in cases["without_tounicode"].read_bytes()
    assert [layer.verdict.value for layer in stripped] == ["trusted"] * len(pages)
    assert max(disagreement(a.text, b.text) for a, b in zip(original, stripped)) < 0.01


def test_layer_text_agrees_with_pdftotext_on_trusted_pages():
    layers = read_layers(derive.SOURCE.read_bytes(), range(41))
    edits = chars = 0
    rates = []
    for layer in layers:
        reference = comparable(derive.pdftotext(derive.SOURCE, layer.page))
        distance = edit_distance(reference, comparable(layer.text))
        edits, chars = edits + distance, chars + len(reference)
        rates.append(distance / len(reference))
    # Measured: corpus CER 0.026, median 0, 33 of 41 pages under 2 %, the same with reading order (XY-cut finds
    # columns only on the two-column index pages, whose content stream is already column by column); what
    # differs is the order of table-of-contents lines and of index entries' page numbers, placed differently by poppler.
    assert edits / chars < 0.05
    assert statistics.median(rates) < 0.005
    assert sum(rate < 0.02 for rate in rates) >= 0.75 * len(rates)


def _sentences(page: int, lines: int) -> list[str]:
    """A page of the manual's text (poppler's reading, TeX's hyphenations joined), rewrapped to lines that fit
    half a US-letter page and end in no hyphen (PDFium joins a word hyphenated at a line's end)."""
    text = re.sub(r"(\w)- (\w)", r"\1\2", " ".join(derive.pdftotext(derive.SOURCE, page).split()))
    return textwrap.wrap(text, 48, break_on_hyphens=False)[:lines]


def test_a_two_column_page_reads_the_left_column_then_the_right_with_header_and_footer_in_place(tmp_path: Path):
    left, right = _sentences(10, 50), _sentences(20, 46)
    header, footer = "Chapter 2: Spreadsheet-like data, set in two columns", "17"
    path = derive.two_columns(tmp_path / "two-columns.pdf", left, right, header, footer)
    [layer] = read_layers(path.read_bytes(), [0])
    assert layer.verdict is Verdict.TRUSTED
    # The content stream interleaves the columns line by line (and writes the footer first, the header last);
    # the layer reads the header, the whole left column top to bottom, then the right one, then the footer.
    assert [comparable(line) for line in layer.text.splitlines()] == [comparable(line) for line in [header, *left, *right, footer]]


def test_reading_order_cuts_columns_and_keeps_single_column_pages_as_written():
    line = 10.0  # a 9 pt line's loose box height, about
    column = [(50.0, 700 - 11 * i, 300.0, 700 - 11 * i + line) for i in range(6)]
    right = [(326.0, y0, 570.0, y1) for _, y0, _, y1 in column]
    header = (50.0, 750.0, 570.0, 760.0)
    interleaved = [header] + [box for pair in zip(column, right) for box in pair]
    assert reading_order(interleaved) == [0, 1, 3, 5, 7, 9, 11, 2, 4, 6, 8, 10, 12]
    assert reading_order([header] + column) is None  # no columns: the content stream's order stands
    # A narrow table inside a single column (each side under a third of the text width) is no column layout.
    table = [(50.0, y0, 120.0, y1) for _, y0, _, y1 in column] + [(150.0, y0, 200.0, y1) for _, y0, _, y1 in column]
    assert reading_order([header] + table) is None
    assert reading_order([header]) is None


def test_edit_distance_is_levenshtein():
    generator = random.Random(7)
    for _ in range(300):
        a = "".join(generator.choice("abc ") for _ in range(generator.randint(0, 90)))
        b = "".join(generator.choice("abcd") for _ in range(generator.randint(0, 90)))
        row = list(range(len(b) + 1))
        for i, char_a in enumerate(a, 1):
            diagonal, row[0] = row[0], i
            for j, char_b in enumerate(b, 1):
                diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (char_a != char_b))
        assert edit_distance(a, b) == row[-1]


def test_routes():
    auto, anchor, model = TextLayerSettings("auto"), TextLayerSettings("anchor"), TextLayerSettings("model")
    assert route(auto, "answer", "trusted", False) == "text_layer"
    assert route(auto, "answer", "trusted", True) == "model"  # the audit sample is read plainly
    assert [route(auto, "answer", verdict, False) for verdict in ("partial", "garbled", "ocr_layer", "none")] == ["model"] * 4
    assert route(model, "answer", "trusted", False) == "model"
    assert route(auto, "none", "trusted", False) == "model" and route(auto, "answer", None, False) == "model"
    assert route(anchor, "answer", "trusted", False) == "text_layer"
    assert [route(anchor, "answer", verdict, False) for verdict in ("partial", "garbled", "ocr_layer", "none")] == [
        "anchor", "model", "model", "model"]
    assert [route(anchor, "anchor", verdict, False) for verdict in ("trusted", "partial", "garbled")] == ["anchor", "anchor", "model"]
    hashes = [f"{n:08x}" + "0" * 56 for n in range(0, 2**32, 2**24)]
    assert sum(audited(h, 0.25) for h in hashes) == len(hashes) // 4 and not any(audited(h, 0.0) for h in hashes)


def units_of(path: Path, limits: DecodeLimits = DecodeLimits()) -> list:
    return list(PlanUnits(limits, ShardSettings()).process(SourceFile(uri=str(path), size_bytes=path.stat().st_size)))


def decode(path: Path, tasks, settings: TextLayerSettings) -> tuple[list[ImageItem], list[LayerAnswers]]:
    decoder = DecodeUnits(DecodeLimits(), ShardSettings(), tasks, settings)
    outputs = [value for unit in units_of(path) for value in _values(decoder.process(unit))]
    assert all(isinstance(value, (ImageItem, LayerAnswers)) for value in outputs), outputs  # nothing failed
    return [o for o in outputs if isinstance(o, ImageItem)], [o for o in outputs if isinstance(o, LayerAnswers)]


def echo(request: EngineRequest) -> Answer:
    return Answer("the model's reading", prompt_tokens=10, generated_tokens=4)


def run(path: Path, tasks, settings: TextLayerSettings) -> tuple[list[dict[str, Any]], DrivenStage, list[ImageItem]]:
    """Decode, the engine stage on the scripted engine, and parse: the result rows, the stage, the engine's items."""
    items, answered = decode(path, tasks, settings)
    stage = DrivenStage(echo, tasks=tasks)
    during, at_end = stage.bundle(items)
    completions = [c for c in during + at_end if isinstance(c, TaskCompletion)] + [
        c for answers in answered for c in answers.completions]
    parse = ParseCompletions(tasks, RUN)
    rows = [row for completion in completions for row in parse.process(completion)]
    pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)  # the rows fit the table
    return rows, stage, items


def test_auto_sends_exactly_the_untrusted_pages_to_the_engine_and_renders_no_other(mixed: Path):
    rows, stage, items = run(mixed, [OCR], TextLayerSettings("auto"))
    untrusted = [page for page, verdict in enumerate(EXPECTED) if verdict != "trusted"]
    assert sorted(item.info.ref.page for item in items) == untrusted  # trusted pages: never rendered
    assert stage.engine.requests == len(untrusted)
    assert sorted(key for key, _ in stage.engine.groups) == sorted(image_key(item) for item in items)
    by_page = {row["page"]: row for row in rows}
    assert sorted(by_page) == list(range(len(EXPECTED))) and len(rows) == len(EXPECTED)  # nothing lost
    for page, verdict in enumerate(EXPECTED):
        row = by_page[page]
        assert row["text_layer_verdict"] == verdict
        assert row["text_source"] == ("text_layer" if verdict == "trusted" else "model")
    layer_rows = [row for row in rows if row["text_source"] == "text_layer"]
    assert all(row["prompt_tokens"] == 0 and row["attempts"] == 0 and row["text_layer_cer"] is None for row in layer_rows)
    assert all(row["task_fingerprint"] == layer_fingerprint() for row in layer_rows)
    [page_5] = read_layers(derive.SOURCE.read_bytes(), [TRUSTED_PAGES[0]])
    assert by_page[0]["text"] == page_5.text and len(page_5.text) > 100
    # The model's rows on pages with a layer carry the agreement; a page without one has nothing to agree with.
    assert all(by_page[p]["text_layer_cer"] is not None for p in untrusted if EXPECTED[p] != "none")
    assert by_page[EXPECTED.index("none")]["text_layer_cer"] is None
    # Sizes: a page answered by its layer has the size it would have rendered at.
    assert {(row["width"], row["height"]) for row in rows} == {(1275, 1651)}


def test_other_tasks_of_a_trusted_page_still_go_to_the_model(mixed: Path):
    items, answered = decode(mixed, [OCR, CAPTION], TextLayerSettings("auto"))
    assert len(items) == len(EXPECTED)
    assert {item.info.ref.page: item.tasks for item in items} == {
        page: ("caption",) if verdict == "trusted" else ("ocr", "caption") for page, verdict in enumerate(EXPECTED)}
    assert all(answers.to_engine for answers in answered) and len(answered) == EXPECTED.count("trusted")


def test_model_mode_sends_every_page_and_still_records_the_verdict(mixed: Path):
    rows, stage, _ = run(mixed, [OCR], TextLayerSettings("model"))
    assert stage.engine.requests == len(EXPECTED)
    assert [row["text_layer_verdict"] for row in sorted(rows, key=lambda r: r["page"])] == EXPECTED
    assert {row["text_source"] for row in rows} == {"model"}
    fingerprints = TaskFingerprints([OCR], SETTINGS)
    assert {row["task_fingerprint"] for row in rows} == {fingerprints.of("ocr", ItemValues(None))}  # as before layers


def test_the_audit_sample_is_read_by_the_model_with_its_agreement(mixed: Path):
    rows, stage, _ = run(mixed, [OCR], TextLayerSettings("auto", check_rate=1.0))
    assert stage.engine.requests == len(EXPECTED)
    trusted = [row for row in rows if row["text_layer_verdict"] == "trusted"]
    assert {row["text_source"] for row in trusted} == {"model"}
    [page_5] = read_layers(derive.SOURCE.read_bytes(), [TRUSTED_PAGES[0]])
    page_0 = next(row for row in trusted if row["page"] == 0)
    assert page_0["text_layer_cer"] == pytest.approx(disagreement(page_5.text, "the model's reading"), abs=1e-6)


def test_anchor_mode_puts_the_layer_in_the_prompt_of_partial_pages_and_of_markdown(mixed: Path):
    rows, stage, items = run(mixed, [OCR, MARKDOWN], TextLayerSettings("anchor"))
    anchored = {(item.info.ref.page, task) for item in items for task in item.anchored}
    partial, trusted = EXPECTED.index("partial"), [p for p, v in enumerate(EXPECTED) if v == "trusted"]
    assert anchored == {(partial, "ocr"), (partial, "markdown")} | {(page, "markdown") for page in trusted}
    sent = [request.instruction for _, requests in stage.engine.groups for request in requests]
    assert sum("RAW_TEXT_START" in instruction for instruction in sent) == len(anchored)
    [figure_page] = read_layers(mixed.read_bytes(), [partial])
    assert any(figure_page.text[:200] in instruction for instruction in sent)
    fingerprints = {(row["page"], row["task"]): row["task_fingerprint"] for row in rows}
    assert fingerprints[(partial, "ocr")] != fingerprints[(EXPECTED.index("garbled"), "ocr")]  # anchored: its own key
    assert {row["text_source"] for row in rows if row["task"] == "ocr" and row["page"] in trusted} == {"text_layer"}


@pytest.mark.parametrize("mode", ["model", "auto", "anchor"])
def test_incremental_keys_are_the_keys_the_rows_carry(mixed: Path, mode: str):
    """The hash pass routes each (page, task) as decoding does: switching modes reruns exactly the rows whose route changed."""
    tasks = [OCR, CAPTION, MARKDOWN]
    settings = TextLayerSettings(mode)
    rows, _, _ = run(mixed, tasks, settings)
    keyed = {}
    for unit in units_of(mixed):
        for content_hash, item in HashUnits(DecodeLimits(), ShardSettings(), tasks, SETTINGS, settings).process(unit):
            keyed.update({(int(item.item_id.rsplit("=", 1)[1]), task): f for task, f in item.fingerprints.items()})
    assert {(row["page"], row["task"]): row["task_fingerprint"] for row in rows} == keyed
    plain = TaskFingerprints(tasks, SETTINGS)
    changed = {key for key, fingerprint in keyed.items() if fingerprint != plain.of(key[1], ItemValues(None))}
    trusted = {p for p, v in enumerate(EXPECTED) if v == "trusted"}
    partial = EXPECTED.index("partial")
    assert changed == {
        "model": set(),
        "auto": {(p, "ocr") for p in trusted},
        "anchor": {(p, "ocr") for p in trusted} | {(partial, "ocr")} | {(p, "markdown") for p in trusted | {partial}},
    }[mode]


def test_a_task_file_opts_a_task_into_the_layer():
    [summary, invoice] = parse_task_file(
        "tasks:\n"
        "  - {name: summary, instruction: Transcribe the page., text_layer: answer}\n"
        "  - {name: invoice, instruction: The total., output: json, schema: {type: object}, text_layer: anchor}\n",
        "tasks.yaml",
    )
    assert (summary.text_layer, invoice.text_layer) == ("answer", "anchor")
    with pytest.raises(TaskFileError, match="only text tasks can be answered"):
        parse_task_file("tasks:\n  - {name: x, instruction: y, output: json, schema: {type: object}, text_layer: answer}\n", "t.yaml")
    with pytest.raises(TaskFileError, match="text_layer"):
        parse_task_file("tasks:\n  - {name: x, instruction: y, text_layer: always}\n", "t.yaml")


def test_verdict_thresholds_order():
    from library.text_layer import LayerSignals, verdict

    def signals(**changed: float) -> LayerSignals:
        base = dict(chars=1000, bad_chars=0, implausible_chars=0, invisible_chars=0, image_coverage=0.0, width_pt=612, height_pt=792)
        return LayerSignals(**{**base, **changed})

    assert verdict(signals()) is Verdict.TRUSTED
    assert verdict(signals(chars=12)) is Verdict.TRUSTED  # a sparse page with nothing else on it
    assert verdict(signals(chars=12, image_coverage=0.9)) is Verdict.NONE
    assert verdict(signals(chars=0)) is Verdict.NONE
    assert verdict(signals(invisible_chars=900, image_coverage=1.0)) is Verdict.OCR_LAYER
    assert verdict(signals(bad_chars=30)) is Verdict.GARBLED and verdict(signals(bad_chars=20)) is Verdict.TRUSTED
    assert verdict(signals(implausible_chars=300)) is Verdict.GARBLED
    assert verdict(signals(image_coverage=0.3)) is Verdict.PARTIAL and verdict(signals(image_coverage=0.1)) is Verdict.TRUSTED


@pytest.mark.engine
def test_a_run_accounts_for_layer_answers_and_switching_modes_reruns_exactly_the_affected_rows(mixed: Path, tmp_path: Path):
    """The real pipeline on the mixed document: auto answers the trusted pages without the engine and
    balances its accounting; a model-mode run with the auto run as history reruns only those pages' ocr."""
    import pyarrow.parquet as pq

    from tests.conftest import run_pipeline

    auto = run_pipeline("--input", str(mixed), "--output", str(tmp_path / "auto"), "--tasks", "ocr,caption")
    counts = auto["counts"]
    trusted = EXPECTED.count("trusted")
    assert auto["state"] == "SUCCEEDED" and auto["accounting"]["balanced"], auto["state_reason"]
    assert (counts["items"], counts["tasks_from_text_layer"], counts["tasks_submitted"]) == (
        len(EXPECTED), trusted, 2 * len(EXPECTED) - trusted)
    assert counts["pages_not_rendered"] == 0  # caption still needs every page's pixels
    rows = pq.read_table(tmp_path / "auto" / "results").to_pylist()
    assert len(rows) == 2 * len(EXPECTED)  # nothing lost: a row per page and task
    ocr = {row["page"]: row for row in rows if row["task"] == "ocr"}
    assert [ocr[page]["text_source"] for page in range(len(EXPECTED))] == [
        "text_layer" if verdict == "trusted" else "model" for verdict in EXPECTED]
    assert [ocr[page]["text_layer_verdict"] for page in range(len(EXPECTED))] == EXPECTED

    switched = run_pipeline("--input", str(mixed), "--output", str(tmp_path / "model"), "--tasks", "ocr,caption",
                            "--text_layer", "model", "--incremental_from", str(tmp_path / "auto"))
    assert switched["accounting"]["balanced"] and switched["counts"]["tasks_submitted"] == trusted
    rerun = pq.read_table(tmp_path / "model" / "results").to_pylist()
    assert sorted((row["page"], row["task"], row["text_source"]) for row in rerun) == [
        (page, "ocr", "model") for page, verdict in enumerate(EXPECTED) if verdict == "trusted"]


def test_a_tasks_text_layer_use_leaves_its_model_fingerprint_as_before():
    """Earlier runs' answers keep matching under --text_layer model: the new field is not part of the request's digest."""
    import dataclasses

    plain = dataclasses.replace(OCR, text_layer="none")
    assert TaskFingerprints([OCR], SETTINGS).of("ocr", ItemValues(None)) == TaskFingerprints([plain], SETTINGS).of("ocr", ItemValues(None))
    assert TaskFingerprints([OCR], SETTINGS).of("ocr", ItemValues(None), "anchor") != TaskFingerprints([OCR], SETTINGS).of("ocr", ItemValues(None))
