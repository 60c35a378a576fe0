"""End to end on the real engine: mixed inputs -> Parquet results/errors + run summary."""
from __future__ import annotations

import io
import json
import pathlib
import zlib
from typing import Optional, Sequence

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.prompts import render_prompt
from library.metadata import ItemValues
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA
from tasks.builtin import BUILTIN_TASKS, DEFAULT_TASKS
from tasks.quality import DEGENERATE_FLAGS, EMPTY, RETRIED, TRUNCATED
from tests.conftest import copy_samples, run_pipeline

pytestmark = pytest.mark.engine  # every test here starts the vLLM engine (the fast tier skips them)

SAMPLE_ITEMS = {  # item id suffix -> pages; data/samples holds 5 files, 8 items
    "chart.webp": None,
    "fax.tiff": [0, 1],
    "receipt.png": None,
    "report.pdf": [0, 1, 2],
    "shapes_rotated.jpg": None,
}
N_ITEMS = 8
BAD_FILES = {
    "empty.png": ("plan", b""),
    "not_a_pdf.pdf": ("plan", b"%PDF-1.4\nthis is not really a PDF"),
}

def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # incompressible
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]

@pytest.fixture(scope="session")
def sample_run(tmp_path_factory, private_model_cache):
    """One run over the bundled samples plus bad files, with the embedded default model."""
    inputs = tmp_path_factory.mktemp("inputs")
    copy_samples(inputs / "good")
    for name, (_, data) in BAD_FILES.items():
        (inputs / "bad" / name).parent.mkdir(exist_ok=True)
        (inputs / "bad" / name).write_bytes(data)
    (inputs / "bad" / "truncated.png").write_bytes(truncated_png())
    out = tmp_path_factory.mktemp("out") / "run"
    summary = run_pipeline(
        "--input", f"{inputs}/good/*", "--input", f"{inputs}/bad/*", "--output", str(out)
    )
    return summary, out, inputs

def read(out: pathlib.Path, table: str):
    return pq.read_table(out / table, schema=RESULTS_SCHEMA if table == "results" else ERRORS_SCHEMA)

def test_every_item_gets_every_task(sample_run):
    _, out, _ = sample_run
    results = read(out, "results").to_pylist()
    assert len(results) == N_ITEMS * len(DEFAULT_TASKS)
    by_item: dict[str, set] = {}
    for row in results:
        by_item.setdefault(row["item_id"], set()).add(row["task"])
    assert len(by_item) == N_ITEMS
    assert all(tasks == set(DEFAULT_TASKS) for tasks in by_item.values())
    pages = {}
    for item_id in by_item:
        name = pathlib.Path(item_id.split("#")[0]).name
        pages.setdefault(name, []).append(int(item_id.split("#page=")[1]) if "#page=" in item_id else None)
    assert {name: sorted(p) if p != [None] else None for name, p in pages.items()} == SAMPLE_ITEMS

def test_result_rows_are_complete(sample_run):
    summary, out, _ = sample_run
    for row in read(out, "results").to_pylist():
        assert row["width"] > 0 and row["height"] > 0
        assert len(row["content_hash"]) == 64
        assert row["prompt_tokens"] > row["cached_tokens"] >= 0
        assert row["finish_reason"] in ("stop", "length")
        assert row["truncated"] == (row["finish_reason"] == "length")
        assert row["model_id"] == summary["model"]["id"] and row["run_id"] == summary["run_id"]
        assert row["prompt_version"] == summary["prompt_version"]
        assert (row["detections"] is not None) == (row["task"] == "detect")
        for box in row["detections"] or []:
            assert 0 <= box["box_1000"]["ymin"] < box["box_1000"]["ymax"] <= 1000

def test_exif_rotated_jpeg_reports_upright_size(sample_run):
    _, out, _ = sample_run
    [row] = [r for r in read(out, "results").to_pylist() if r["item_id"].endswith("shapes_rotated.jpg") and r["task"] == "ocr"]
    assert (row["width"], row["height"]) == (400, 300)

def test_bad_files_become_error_rows_and_nothing_else_is_lost(sample_run):
    summary, out, inputs = sample_run
    errors = {pathlib.Path(r["source_uri"]).name: r for r in read(out, "errors").to_pylist()}
    assert set(errors) == {*BAD_FILES, "truncated.png"}
    for name, (stage, _) in BAD_FILES.items():
        assert errors[name]["stage"] == stage
    assert errors["truncated.png"]["stage"] == "decode"
    for row in errors.values():
        assert row["error_type"] and row["message"] and row["task"] is None
    assert summary["accounting"]["balanced"] is True
    assert summary["accounting"]["items_in"] == N_ITEMS + len(errors)

def test_summary_counts_match_the_files(sample_run):
    summary, out, _ = sample_run
    on_disk = json.loads((out / "run_summary.json").read_text())
    assert on_disk["run_id"] == summary["run_id"]
    results = read(out, "results")
    counts = on_disk["counts"]
    assert counts["files_matched"] == 5 + 3
    assert counts["items"] == N_ITEMS and counts["pages"] == 5
    assert counts["result_rows"] == results.num_rows == counts["tasks_submitted"]
    assert counts["error_rows"] == read(out, "errors").num_rows == 3
    # The files and rows the sinks reported, as the files themselves say (the summary opens none of them).
    for table in ("results", "errors"):
        listed = {f["path"]: f["rows"] for f in on_disk["outputs"][table]}
        assert listed == {str(path): pq.ParquetFile(path).metadata.num_rows for path in (out / table).glob("*.parquet")}
    assert counts["error_rows_by_stage"] == {"plan": 2, "decode": 1}
    tokens = on_disk["tokens"]
    assert tokens["prompt"] == sum(results.column("prompt_tokens").to_pylist())
    assert tokens["generated"] == sum(results.column("generated_tokens").to_pylist())
    assert tokens["cached"] == sum(results.column("cached_tokens").to_pylist())
    assert on_disk["model"]["random_weights"] is True and "RANDOM" in on_disk["warning"]
    assert on_disk["versions"]["apache-beam"] and on_disk["wall_time_s"] > 0

def test_the_random_models_degenerate_answers_are_retried_flagged_and_counted(sample_run):
    """The random model writes until max_tokens (SMALL_OUTPUTS) and loops: its text answers climb the ladder
    and what is still degenerate is kept, flagged consistently with the row, and counted in the summary."""
    summary, out, _ = sample_run
    rows = read(out, "results").to_pylist()
    flagged, by_flag = 0, {}
    for row in rows:
        flags = row["quality_flags"]
        assert set(flags) <= set(DEGENERATE_FLAGS) | {RETRIED} and len(set(flags)) == len(flags), row
        assert (TRUNCATED in flags) == (row["finish_reason"] == "length"), row
        assert (RETRIED in flags) == (row["attempts"] > 1), row
        assert (EMPTY in flags) == (row["task"] != "detect" and not (row["text"] or "").strip()), row
        if row["task"] != "detect" and set(flags) & set(DEGENERATE_FLAGS):
            assert row["attempts"] == len(BUILTIN_TASKS[row["task"]].retries) + 1, row  # kept after the whole ladder
        assert 0.0 <= row["confidence"] <= 1.0, row  # every answer of every kind is scored
        assert row["language"] is None or (row["task"] != "detect" and len(row["language"]) == 2), row
        flagged += bool(set(flags) & set(DEGENERATE_FLAGS))
        for flag in flags:
            by_flag[flag] = by_flag.get(flag, 0) + 1
    # Whether the random model truncates at all differs between processors (its tokens do): the rules above hold
    # for whatever it wrote; tests/test_run_tasks.py drives a scripted truncation and loop through the ladder.
    counts = summary["counts"]
    assert counts["quality_flags"] == by_flag and counts["flagged_results"] == flagged
    assert counts["retries"] == sum(row["attempts"] - 1 for row in rows)
    assert summary["error_budget"]["flagged_results_counted"] == 0  # kept, not counted as errors (the default)

def prefix_lengths(
    checkpoint: pathlib.Path, instructions: Optional[Sequence[str]] = None, vision_tokens: Optional[int] = None
) -> tuple[int, int]:
    """(tokens before the image, tokens shared by the prompts through the image) per the checkpoint's processor.

    `instructions`: the tasks' (default: the default tasks'); `vision_tokens`: the image budget (default: the model's).
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(checkpoint))
    tokenizer = processor.tokenizer
    if instructions is None:
        instructions = [BUILTIN_TASKS[name].request(ItemValues(None)).instruction for name in DEFAULT_TASKS]
    prompts = [render_prompt(text, tokenizer.apply_chat_template) for text in instructions]
    image = Image.new("RGB", (320, 240), "white")
    budget = {"max_soft_tokens": vision_tokens} if vision_tokens else {}
    ids = [list(processor(text=[prompt], images=[image], **budget)["input_ids"][0]) for prompt in prompts]
    shared = next(i for i, column in enumerate(zip(*ids)) if len(set(column)) > 1)
    image_token = tokenizer.convert_tokens_to_ids("<|image|>")
    return ids[0].index(image_token), shared

def fresh_images(directory: pathlib.Path, count: int) -> None:
    """Images this engine has never seen (the session shares one engine and its prefix cache).

    Seeded from the test's own folder name (pytest makes it unique in a session): the same test gets
    the same images on every run, so a failure reproduces, and no two tests share an image.
    """
    directory.mkdir()
    rng = np.random.default_rng(zlib.crc32(f"{directory.parent.name}/{directory.name}".encode()))
    for index in range(count):
        pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"fresh-{index}.png")

def test_tasks_of_an_image_and_their_retries_reuse_its_prefix_and_images_never_share(tmp_path, tiny_checkpoint):
    fresh_images(tmp_path / "in", 6)
    run_pipeline("--input", f"{tmp_path}/in/*", "--output", str(tmp_path / "out"))
    before_image, through_image = prefix_lengths(tiny_checkpoint)
    rows_by_item: dict[str, list[dict]] = {}
    for row in read(tmp_path / "out", "results").to_pylist():
        rows_by_item.setdefault(row["item_id"], []).append(row)
    # KV blocks are cached whole: the hybrid sliding/full layout of this model
    # shares in 64-token units, so up to 63 tokens of the shared prefix are recomputed.
    block = 64
    first_attempts = retries = 0
    for item_id, rows in rows_by_item.items():
        # A row keeps its last attempt's counts. A retried answer (the random model's text answers all run to
        # max_tokens; a boxes answer that failed validation) was re-asked while the image was hot: its whole
        # prompt, up to block granularity, came from the prefix cache (tasks/quality.py, transforms/run_tasks.py).
        for row in rows:
            if row["attempts"] > 1:
                assert row["prompt_tokens"] - block <= row["cached_tokens"] <= row["prompt_tokens"], (item_id, row)
                retries += 1
        once = sorted(row["cached_tokens"] for row in rows if row["attempts"] == 1)
        if len(once) == len(rows):
            first, *others = once
            # The first task of an image can reuse only the system prompt: never another image's blocks.
            assert first <= before_image, (item_id, first)
            # The other tasks reuse the whole shared prefix through the image, up to block granularity.
            assert all(through_image - block < c <= through_image for c in others), (item_id, others, through_image)
        else:
            # A first attempt whose sibling tasks were retried: the first of the image, or one that shared it.
            assert all(c <= before_image or through_image - block < c <= through_image for c in once), (item_id, once)
        first_attempts += len(once)
    assert retries >= 6 and first_attempts >= 3, (retries, first_attempts)

def test_task_subset(tmp_path, private_model_cache):
    inputs = tmp_path / "in"
    copy_samples(inputs)
    summary = run_pipeline(
        "--input", f"{inputs}/receipt.png", "--input", f"{inputs}/chart.webp", "--output", str(tmp_path / "out"),
         "--tasks", "caption", "--num_output_shards", "2"
    )
    rows = read(tmp_path / "out", "results").to_pylist()
    assert [r["task"] for r in rows] == ["caption", "caption"]
    assert len(summary["outputs"]["results"]) == 2 and len(summary["outputs"]["errors"]) == 2
    assert summary["counts"]["tasks_per_item"] == 1 and summary["accounting"]["balanced"]

def test_missing_input_pattern_is_an_error_row(tmp_path, private_model_cache):
    inputs = tmp_path / "in"
    copy_samples(inputs)
    summary = run_pipeline(
        "--input", f"{inputs}/receipt.png", "--input", f"{tmp_path}/nowhere/*.png",
         "--output", str(tmp_path / "out"), "--tasks", "ocr"
    )
    [error] = read(tmp_path / "out", "errors").to_pylist()
    assert (error["stage"], error["error_type"]) == ("match", "NoMatch")
    assert summary["counts"]["result_rows"] == 1 and summary["accounting"]["balanced"]
