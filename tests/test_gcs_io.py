"""Production I/O against a real local GCS server: gs:// in and out, shards, manifests, weights, incremental runs."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.model_staging import MARKER, stage_checkpoint
import engine.prompts
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA
from tests.conftest import SAMPLES, run_pipeline
from tests.gcs_emulator import BUCKET
from tests.shard_data import write_parquet_shard, write_tar

ROOT = f"gs://{BUCKET}"


@pytest.fixture(scope="module")
def bucket_inputs(gcs, tmp_path_factory):
    """Mixed inputs in the emulator: images, a 3-page PDF, tar + tar.gz shards, a Parquet shard, a manifest."""
    local = tmp_path_factory.mktemp("gcs-inputs")
    (local / "scans").mkdir()
    for name in ("receipt.png", "report.pdf"):
        shutil.copy(SAMPLES / name, local / "scans" / name)
    (local / "shards").mkdir()
    write_tar(local / "shards" / "000000.tar")
    write_tar(local / "shards" / "000001.tar.gz", "w:gz")
    write_parquet_shard(local / "shards" / "images.parquet")
    (local / "listed").mkdir()
    shutil.copy(SAMPLES / "chart.webp", local / "listed" / "chart with space.webp")
    (local / "listed" / "manifest.txt").write_text("# nightly manifest\nchart with space.webp\nmissing.png\n")
    gcs.upload(local, f"{ROOT}/inputs")
    return f"{ROOT}/inputs"


# receipt 1 + report 3 pages + 2 tars x 3 images + parquet 2 images + chart 1
EXPECTED_ITEMS = 1 + 3 + 2 * 3 + 2 + 1
# each tar's imageless sample, the null Parquet cell, the missing manifest entry
EXPECTED_ERRORS = 2 + 1 + 1
INPUT_ARGS = ("--input", "{inputs}/scans/*", "--input", "{inputs}/shards/**", "--manifest", "{inputs}/listed/manifest.txt",
              "--parquet_passthrough_columns", "license")


def input_args(inputs: str) -> list[str]:
    return [arg.format(inputs=inputs) for arg in INPUT_ARGS]


def read_gs(gcs, location: str, table: str) -> pa.Table:
    path = f"{location[len('gs://'):]}/{table}"
    schema = RESULTS_SCHEMA if table == "results" else ERRORS_SCHEMA
    return pq.read_table(path, filesystem=gcs.arrow_filesystem(), schema=schema)


@pytest.fixture(scope="module")
def first_run(gcs, bucket_inputs):
    output = f"{ROOT}/runs/first"
    summary = run_pipeline(*input_args(bucket_inputs), "--output", output)
    return summary, output


@pytest.mark.engine
def test_gs_to_gs_with_mixed_shards(gcs, first_run, bucket_inputs):
    summary, output = first_run
    results = read_gs(gcs, output, "results").to_pylist()
    errors = read_gs(gcs, output, "errors").to_pylist()
    tasks = summary["counts"]["tasks_per_item"]
    assert len(results) == EXPECTED_ITEMS * tasks
    assert len({(r["item_id"], r["task"]) for r in results}) == len(results)
    assert summary["counts"]["items"] == EXPECTED_ITEMS and summary["accounting"]["balanced"]
    by_item = {r["item_id"]: r for r in results}
    tar_item = by_item[f"{bucket_inputs}/shards/000000.tar#member=shard/000001"]
    assert json.loads(tar_item["metadata"]) == {"json": {"source": "camera-1", "tags": ["a"]}}
    assert json.loads(by_item[f"{bucket_inputs}/shards/000001.tar.gz#member=shard/000002"]["metadata"]) == {"txt": "a green square"}
    assert json.loads(by_item[f"{bucket_inputs}/shards/images.parquet#member=p-2"]["metadata"]) == {"license": "cc0"}
    assert f"{bucket_inputs}/listed/chart with space.webp" in by_item
    assert f"{bucket_inputs}/scans/report.pdf#page=2" in by_item
    kinds = sorted((e["stage"], e["error_type"], e["member"]) for e in errors)
    assert kinds == [
        ("decode", "MissingImage", "p-3"),
        ("match", "NotFound", None),
        ("plan", "MissingImage", "shard/000004"),
        ("plan", "MissingImage", "shard/000004"),
    ]
    assert len(errors) == EXPECTED_ERRORS
    summary_blob = gcs.client().bucket(BUCKET).blob("runs/first/run_summary.json").download_as_text()
    assert json.loads(summary_blob)["counts"]["result_rows"] == len(results)


@pytest.mark.engine
def test_incremental_rerun_writes_nothing_new(gcs, first_run, bucket_inputs):
    _, first = first_run
    output = f"{ROOT}/runs/second"
    summary = run_pipeline(*input_args(bucket_inputs), "--output", output, "--incremental_from", first)
    assert read_gs(gcs, output, "results").num_rows == 0
    counts = summary["counts"]
    assert counts["skipped_items"] == EXPECTED_ITEMS
    assert counts["skipped_tasks"] == EXPECTED_ITEMS * counts["tasks_per_item"]
    assert counts["tasks_submitted"] == 0 and summary["accounting"]["balanced"]
    # Unanswerable inputs are retried (and fail again) every run: errors are never "done".
    assert read_gs(gcs, output, "errors").num_rows == EXPECTED_ERRORS


@pytest.mark.engine
def test_incremental_reprocesses_a_new_prompt_version_or_model(gcs, first_run, bucket_inputs, monkeypatch):
    _, first = first_run
    scans = ["--input", f"{bucket_inputs}/scans/receipt.png", "--incremental_from", first, "--incremental_from", f"{ROOT}/runs/never"]
    monkeypatch.setattr(engine.prompts, "PROMPT_VERSION", "v-next")
    summary = run_pipeline(*scans, "--output", f"{ROOT}/runs/new-prompts")
    assert summary["counts"]["skipped_tasks"] == 0
    assert read_gs(gcs, f"{ROOT}/runs/new-prompts", "results").num_rows == summary["counts"]["tasks_per_item"]
    monkeypatch.undo()
    summary = run_pipeline(*scans, "--output", f"{ROOT}/runs/new-model", "--model_id", "another-model")
    assert summary["counts"]["skipped_tasks"] == 0 and summary["counts"]["result_rows"] == 3


@pytest.mark.engine
def test_model_weights_from_gs_are_staged_once(gcs, tiny_checkpoint, bucket_inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("VISION_BATCH_MODEL_DIR", str(tmp_path / "staged"))
    model_uri = gcs.upload(tiny_checkpoint, f"{ROOT}/models/tiny-gemma4")
    first = run_pipeline("--input", f"{bucket_inputs}/scans/receipt.png", "--output", f"{ROOT}/runs/gs-model",
                         "--model", model_uri, "--tasks", "ocr")
    assert first["model"]["id"] == model_uri and first["counts"]["result_rows"] == 1
    [staged] = [p for p in (tmp_path / "staged").iterdir() if p.is_dir()]
    marker = staged / MARKER
    assert {p.name for p in staged.iterdir()} >= {"config.json", "model.safetensors", MARKER}
    stamp = marker.stat().st_mtime_ns
    # A second stage (another process on the same VM) reuses the complete copy ...
    assert stage_checkpoint(model_uri) == str(staged) and marker.stat().st_mtime_ns == stamp
    # ... and a damaged copy is detected and replaced.
    (staged / "config.json").write_text("{}")
    assert stage_checkpoint(model_uri) == str(staged)
    assert (staged / "config.json").read_bytes() == (tiny_checkpoint / "config.json").read_bytes()


@pytest.mark.engine
def test_multi_process_run_matches_single_process(gcs, first_run, bucket_inputs):
    output = f"{ROOT}/runs/multi"
    run_pipeline(*input_args(bucket_inputs), "--output", output,
                 "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    # Identity and prompts must match exactly; generated text may differ by batch
    # composition (floating-point order), which is not what this test is about.
    columns = ["item_id", "task", "content_hash", "width", "height", "prompt_tokens", "metadata"]
    single = read_gs(gcs, first_run[1], "results").select(columns).to_pylist()
    multi = read_gs(gcs, output, "results").select(columns).to_pylist()
    key = lambda row: (row["item_id"], row["task"])  # noqa: E731
    assert sorted(multi, key=key) == sorted(single, key=key)
    error_key = lambda row: (row["item_id"], row["stage"], row["error_type"])  # noqa: E731
    assert sorted(map(error_key, read_gs(gcs, output, "errors").to_pylist())) == sorted(
        map(error_key, read_gs(gcs, first_run[1], "errors").to_pylist())
    )
