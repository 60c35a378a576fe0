"""Per-request isolation on the real engine, and the MoE checkpoint through the same path."""
from __future__ import annotations

import pyarrow.parquet as pq


from tests.conftest import copy_samples, run_pipeline


def test_a_request_the_engine_rejects_fails_only_its_own_task(tmp_path, private_model_cache):
    inputs = tmp_path / "in"
    copy_samples(inputs)
    # With a 256-token context the OCR and detect prompts (~280-300 tokens with the
    # image) are too long for the engine; the shorter caption prompt fits.
    summary = run_pipeline(
        "--input", f"{inputs}/receipt.png", "--input", f"{inputs}/chart.webp", "--output", str(tmp_path / "out"),
         "--engine_arg", "max_model_len=256"
    )
    results = pq.read_table(tmp_path / "out" / "results").to_pylist()
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert sorted(r["task"] for r in results) == ["caption", "caption"]
    assert sorted(e["task"] for e in errors) == ["detect", "detect", "ocr", "ocr"]
    assert {e["stage"] for e in errors} == {"engine"}
    assert all("max_model_len" in e["message"] or "longer than" in e["message"] for e in errors), errors
    assert summary["accounting"]["balanced"] and summary["counts"]["error_rows_by_stage"] == {"engine": 4}


def test_moe_checkpoint_runs_through_the_same_path(tmp_path, private_model_cache):
    inputs = tmp_path / "in"
    copy_samples(inputs)
    summary = run_pipeline(
        "--input", f"{inputs}/report.pdf", "--output", str(tmp_path / "out"), "--tiny_preset", "tiny-moe"
    )
    assert "tiny-moe" in summary["model"]["id"]
    assert summary["counts"]["result_rows"] == 3 * 3 and summary["accounting"]["balanced"]
