"""The run report (`python -m pipelines.report OUT --html report.html`), read as HTML and in headless Chromium.

One real pipeline run (files, a PDF, a tar and a Parquet shard, bad
inputs) gives the report to check; hand-written result tables carry
hostile model output to check it stays text.
"""
from __future__ import annotations

import base64
import collections
import html
import io
import json
import pathlib
import re
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
from PIL import Image

from evaluation.storage import write_parquet
from library.formats import DecodeLimits
from library.shards import ShardSettings
from pipelines import report
from reporting.images import PALETTE, draw_detections, load_images
from reporting.run import choose_sample
from reporting.text import redact, visible
from schemas.records import Block, Detection, ErrorRecord, ItemInfo, ItemRef, ParsedAnswer, RunInfo, Stage, TaskCompletion
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA, error_row, result_row
from tests.conftest import SAMPLES, copy_samples, run_pipeline
from tests.gcs_emulator import BUCKET
from tests.shard_data import write_parquet_shard, write_tar

FILES = ("receipt.png", "shapes_rotated.jpg", "report.pdf")
GOOD_ITEMS = (
    "files/receipt.png", "files/shapes_rotated.jpg", *(f"files/report.pdf#page={p}" for p in range(3)),
    *(f"shards/000000.tar#member=shard/00000{n}" for n in (1, 2, 3)),
    "shards/images.parquet#member=p-1", "shards/images.parquet#member=p-2",
)
ERROR_ITEMS = {  # item -> the reason shown instead of its image
    "bad/empty.png": "file is empty",
    "shards/000000.tar#member=shard/000004": "holds no image",
    "shards/images.parquet#member=p-3": "holds no image",
}
HOSTILE_OCR = "<script>alert(1)</script>"
HOSTILE_CAPTION = "<img src=x onerror=alert(2)>"
DETECT_ANSWER = '[{"box_2d": [100, 200, 500, 600], "label": "<b>square</b>"}]'
HOSTILE_LABEL = "<b>square</b>"
HOSTILE_MESSAGE = "</pre><script>alert(3)</script>"
HOSTILE_THOUGHT = "</details><script>alert(4)</script>"
HOSTILE_DATA = {"note": "</pre><script>alert(5)</script>", "total": 12.5}  # a json task's document
HOSTILE_QUESTION = "Answer briefly: is <i>this</i> a square?"  # a question filled from the item's metadata
SECRET_URI = "https://reader:s3cr3t-pass@example.com/scan.png?X-Goog-Signature=abcdef123"
SQUARE = (0.1, 0.2, 0.5, 0.6)  # ymin, xmin, ymax, xmax fractions of shapes_rotated.jpg's upright 400x300 frame


def chromium(*args: str, profile: pathlib.Path) -> str:
    """Run headless Chromium offline; returns its stdout. Fails (never skips) when it is not installed."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed: run `bash scripts/setup_system.sh` (Debian package `chromium`)")
    done = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def render_report(output: str, page: pathlib.Path, *options: str) -> str:
    assert report.main([output, "--html", str(page), *options]) == 0
    return page.read_text(encoding="utf-8")


def item_cards(page: str) -> list[str]:
    """Item ids of the item cards, in page order."""
    return [html.unescape(m) for m in re.findall(r'<h3><span class="num">#\d+</span>(.*?)</h3>', page)]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, private_model_cache):
    inputs = tmp_path_factory.mktemp("report-inputs")
    copy_samples(inputs / "files")
    (inputs / "shards").mkdir()
    write_tar(inputs / "shards" / "000000.tar")
    write_parquet_shard(inputs / "shards" / "images.parquet")
    (inputs / "bad").mkdir()
    (inputs / "bad" / "empty.png").write_bytes(b"")
    out = tmp_path_factory.mktemp("report-out") / "run"
    file_args = [arg for name in FILES for arg in ("--input", f"{inputs}/files/{name}")]
    summary = run_pipeline(*file_args, "--input", f"{inputs}/shards/*", "--input", f"{inputs}/bad/*", "--output", str(out))
    assert summary["accounting"]["balanced"]
    return inputs, out


@pytest.fixture(scope="module")
def pipeline_report(pipeline_run, tmp_path_factory) -> tuple[pathlib.Path, str]:
    inputs, out = pipeline_run
    page = tmp_path_factory.mktemp("report") / "report.html"
    return page, render_report(str(out), page)


@pytest.mark.engine
def test_report_lists_every_item_with_its_image_or_the_reason(pipeline_run, pipeline_report):
    inputs, out = pipeline_run
    _, page = pipeline_report
    expected = sorted(f"{inputs}/{item}" for item in (*GOOD_ITEMS, *ERROR_ITEMS))
    assert item_cards(page) == expected
    assert page.count('<img src="data:image/jpeg;base64,') == len(GOOD_ITEMS)
    assert "source changed since the run" not in page  # re-read sources hash to the rows' content_hash
    assert page.count("Source not available") == len(ERROR_ITEMS)
    for reason in ERROR_ITEMS.values():
        assert re.search(rf'<span class="reason">[^<]*{reason}', page)
    # Summary from run_summary.json, and the errors table broken down by stage and type.
    assert "balanced" in page and "Random weights." in page
    errors = pq.read_table(out / "errors").to_pylist()
    assert {f"{inputs}/{item}" for item in ERROR_ITEMS} == {row["item_id"] for row in errors}
    groups = collections.Counter((row["stage"], row["error_type"]) for row in errors)
    for (stage, error_type), count in groups.items():
        assert f'<td class="">{stage}</td><td class=""><code>{error_type}</code></td><td class="num">{count}</td>' in page
    for task in ("OCR text", "Caption", "Detections"):
        assert page.count(f"<h4>{task}") == len(GOOD_ITEMS)
    assert 'class="question"' not in page  # the built-in tasks ask every item the same


@pytest.mark.engine
def test_report_images_are_the_frames_the_pipeline_saw(pipeline_run):
    """Re-decoded sources have the size the results record (EXIF-rotated, PDF pages, tar and Parquet members)."""
    _, out = pipeline_run
    from reporting.run import load_run

    run = load_run(str(out), sample_size=100)
    images = load_images(
        [ItemRef.make(i.source_uri, page=i.page, member=i.member) for i in run.sample], DecodeLimits(), ShardSettings()
    )
    sizes = {i.item_id: (i.width, i.height) for i in run.sample if i.results}
    assert len(sizes) == len(GOOD_ITEMS)
    assert {item_id: images[item_id].image.size for item_id in sizes} == sizes


@pytest.mark.engine
def test_report_is_self_contained(pipeline_report):
    _, page = pipeline_report
    assert "<script" not in page.lower()
    assert '<meta http-equiv="Content-Security-Policy"' in page
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert links and all(link.startswith(("data:image/", "#")) for link in links), {l[:40] for l in links}
    assert "url(" not in page and "@import" not in page


@pytest.mark.engine
def test_report_renders_in_headless_chromium(pipeline_run, pipeline_report, tmp_path):
    inputs, _ = pipeline_run
    page_path, _ = pipeline_report
    screenshot = tmp_path / "report.png"
    chromium(f"--screenshot={screenshot}", "--window-size=1400,2000", page_path.as_uri(), profile=tmp_path / "profile")
    assert screenshot.stat().st_size > 10_000
    with Image.open(screenshot) as image:
        assert image.size == (1400, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert len(colours) > 200, "the screenshot is (nearly) a single colour"
    # The page as the browser parsed it lists every item.
    dom = chromium("--dump-dom", page_path.as_uri(), profile=tmp_path / "profile")
    for item in (*GOOD_ITEMS, *ERROR_ITEMS):
        assert html.escape(f"{inputs}/{item}", quote=False) in dom


@pytest.mark.engine
def test_errors_first_sample(pipeline_run, tmp_path):
    inputs, out = pipeline_run
    page = render_report(str(out), tmp_path / "errors.html", "--sample", "3", "--order", "errors_first")
    assert item_cards(page) == sorted(f"{inputs}/{item}" for item in ERROR_ITEMS)
    assert "3 of 13 items" in page


def test_a_location_without_tables_is_a_clear_error(tmp_path, capsys):
    assert report.main([str(tmp_path / "nowhere"), "--html", str(tmp_path / "r.html")]) == 2
    assert "no results or errors Parquet files under" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_sample_orders():
    ids = [f"item-{n:02d}" for n in range(10)]
    concern = {"item-07": 0, "item-03": 1, "item-05": 0}
    assert choose_sample(ids, concern, 4, "item_id") == ids[:4]
    assert choose_sample(ids, concern, 4, "errors_first") == ["item-05", "item-07", "item-03", "item-00"]
    assert choose_sample(ids, concern, 5, "spread") == ["item-00", "item-02", "item-04", "item-06", "item-08"]
    assert choose_sample(ids, concern, 20, "spread") == ids


def hostile_location(root: str, image_uri: str) -> None:
    """Hand-made results/errors (no run_summary.json) whose model output and labels are HTML."""
    run = RunInfo(run_id="hand-made", model_id="hostile-model", prompt_version="v0")
    info = ItemInfo(ref=ItemRef.make(image_uri), width=400, height=300, content_hash="0" * 64)

    def completion(task: str, text: str, thought: str | None = None, instruction: str | None = None, **quality) -> TaskCompletion:
        return TaskCompletion(info=info, task=task, text=text, finish_reason="stop", prompt_tokens=300,
                              generated_tokens=12, cached_tokens=256, latency_s=0.25, thought=thought,
                              instruction=instruction, **quality)

    ymin, xmin, ymax, xmax = SQUARE
    square = Detection(label=HOSTILE_LABEL, box_1000=tuple(round(v * 1000) for v in SQUARE), box_norm=SQUARE,
                       box_px=(round(ymin * 300), round(xmin * 400), round(ymax * 300), round(xmax * 400)))
    results = [
        result_row(completion("ocr", HOSTILE_OCR, quality_flags=("looped", "retried"), confidence=0.42, language="en"),
                   run, ParsedAnswer(HOSTILE_OCR)),
        result_row(completion("caption", HOSTILE_CAPTION, thought=HOSTILE_THOUGHT), run, ParsedAnswer(HOSTILE_CAPTION)),
        result_row(completion("detect", DETECT_ANSWER), run, ParsedAnswer(DETECT_ANSWER, (square,))),
        result_row(completion("invoice", json.dumps(HOSTILE_DATA), instruction="Extract.",
                              field_confidence=(("<b>note", 0.97), ("total", 0.2))), run,
                   ParsedAnswer(json.dumps(HOSTILE_DATA), data=json.dumps(HOSTILE_DATA))),
        result_row(completion("answer", "yes", instruction=HOSTILE_QUESTION), run, ParsedAnswer("yes")),
        result_row(completion("layout", "[...]"), run, ParsedAnswer(
            f"# {HOSTILE_CAPTION}", blocks=(Block(0, "title", HOSTILE_CAPTION, square.box_1000, square.box_norm, square.box_px),))),
    ]
    errors = [
        error_row(ErrorRecord(ref=ItemRef.make(image_uri, page=1), stage=Stage.PARSE, error_type="DetectionParseError",
                              message=HOSTILE_MESSAGE, task="detect", raw_output=HOSTILE_MESSAGE), run),
        error_row(ErrorRecord(ref=ItemRef.make(SECRET_URI), stage=Stage.PLAN, error_type="DecodeError",
                              message=f"could not read {SECRET_URI}"), run),
    ]
    write_parquet(f"{root}/results/part-00000-of-00001.parquet", results, RESULTS_SCHEMA)
    write_parquet(f"{root}/errors/part-00000-of-00001.parquet", errors, ERRORS_SCHEMA)


def assert_hostile_text_is_text(page: str) -> None:
    assert "<script" not in page.lower() and "<b>square" not in page and "<img src=x" not in page
    for hostile in (HOSTILE_OCR, HOSTILE_CAPTION, HOSTILE_LABEL, HOSTILE_MESSAGE, HOSTILE_THOUGHT):
        assert html.escape(hostile) in page
    assert "s3cr3t" not in page and "abcdef123" not in page
    assert "https://***@example.com/scan.png?X-Goog-Signature=***" in page
    assert "computed from the tables" in page
    assert "<summary>thought</summary>" in page  # a thinking-mode thought is shown, collapsed, beside its answer
    # A json task's document, laid out; each item's own question above its answer (no summary: every instruction shown).
    assert html.escape(json.dumps(HOSTILE_DATA, indent=2)) in page and "invoice (JSON)" in page
    assert f'<p class="question">{html.escape(HOSTILE_QUESTION)}</p>' in page
    # A layout answer: its blocks listed by category, its Markdown collapsed beside them.
    assert "Layout (1)" in page and '<span class="lbl">title</span>' in page and html.escape(f"# {HOSTILE_CAPTION}") in page
    # An answer's quality: its flags (degenerate ones as warnings), confidence and language; the tasks table's.
    assert '<span class="pill warn">looped</span>' in page and '<span class="pill ">retried</span>' in page
    assert "confidence 0.420" in page and "language en" in page and "mean confidence" in page
    assert "fields &lt;b&gt;note 0.970, total 0.200" in page  # a json answer's per-field confidence


def test_model_output_is_shown_as_text(tmp_path):
    source = pathlib.Path(shutil.copy(SAMPLES / "shapes_rotated.jpg", tmp_path / "shapes_rotated.jpg"))
    hostile_location(str(tmp_path / "out"), str(source))
    page_path = tmp_path / "hostile.html"
    page = render_report(str(tmp_path / "out"), page_path)
    assert_hostile_text_is_text(page)
    assert page.count('<img src="data:image/jpeg;base64,') == 1
    assert "source changed since the run" in page  # the hand-made row's content_hash is not the file's
    # As the browser parsed it: the hostile strings are text nodes, never elements.
    dom = chromium("--dump-dom", page_path.as_uri(), profile=tmp_path / "profile")
    assert "<script" not in dom.lower() and "<b>square" not in dom
    assert html.escape(HOSTILE_OCR, quote=False) in dom and dom.count("<img") == 1


def test_boxes_are_drawn_in_the_upright_frame(tmp_path):
    source = SAMPLES / "shapes_rotated.jpg"
    [loaded] = load_images([ItemRef.make(str(source))], DecodeLimits(), ShardSettings()).values()
    assert loaded.image.size == (400, 300)  # EXIF orientation applied, as the results record it
    ymin, xmin, ymax, xmax = SQUARE
    drawn = draw_detections(loaded.image, [{"label": "square", "box": dict(ymin=ymin, xmin=xmin, ymax=ymax, xmax=xmax)}])
    red = tuple(int(PALETTE[0][i:i + 2], 16) for i in (1, 3, 5))
    assert drawn.getpixel((round(xmin * 400), round((ymin + ymax) / 2 * 300))) == red  # left edge
    assert drawn.getpixel((round(xmax * 400) - 1, round((ymin + ymax) / 2 * 300))) == red  # right edge
    assert loaded.image.getpixel((round(xmin * 400), round((ymin + ymax) / 2 * 300))) != red


def test_unreadable_sources_say_why(tmp_path):
    missing = load_images([ItemRef.make(str(tmp_path / "gone.png"))], DecodeLimits(), ShardSettings())
    [reason] = [image.reason for image in missing.values()]
    assert reason and "gone.png" in reason
    shard = tmp_path / "000000.tar"
    write_tar(shard)
    found = load_images(
        [ItemRef.make(str(shard), member="shard/000002"), ItemRef.make(str(shard), member="shard/999999")],
        DecodeLimits(), ShardSettings(),
    )
    assert found[f"{shard}#member=shard/000002"].image.size == (96, 64)
    assert "not in the shard" in found[f"{shard}#member=shard/999999"].reason


def test_text_helpers():
    assert visible("a\x1bb\x00c\td\n") == "a\u241bb\u2400c\td\n"
    assert redact("gs://bucket/a.png") == "gs://bucket/a.png"
    assert redact("https://u:p@h/x?a=1&token=t0k&b=2") == "https://***@h/x?a=1&token=***&b=2"


def test_report_reads_gs_locations(gcs, tmp_path):
    """Tables, summary-less location and the source image all on gs://; the page written to gs:// too."""
    root = f"gs://{BUCKET}/report"
    image_uri = gcs.upload(SAMPLES / "shapes_rotated.jpg", f"{root}/inputs/shapes_rotated.jpg")
    hostile_location(f"{root}/out", image_uri)
    assert report.main([f"{root}/out", "--html", f"{root}/report.html"]) == 0
    page = gcs.client().bucket(BUCKET).blob("report/report.html").download_as_text()
    assert_hostile_text_is_text(page)
    [thumbnail] = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"', page)
    with Image.open(io.BytesIO(base64.b64decode(thumbnail))) as image:
        assert image.size == (400, 300)
