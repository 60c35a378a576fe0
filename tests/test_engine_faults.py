"""Model and engine faults on the real engine: retry ladder, engine failure mid-bundle."""
from __future__ import annotations

import collections

import pyarrow.parquet as pq
import pytest

from tests.conftest import copy_samples, run_pipeline

pytestmark = pytest.mark.engine  # every test here starts the vLLM engine (the fast tier skips them)


def test_unparseable_detections_climb_the_retry_ladder_then_become_errors(tmp_path):
    inputs = tmp_path / "in"
    copy_samples(inputs)
    # Without schema-constrained decoding (as on TPU) the random model's "JSON" never parses.
    summary = run_pipeline(
        "--input", f"{inputs}/receipt.png", "--input", f"{inputs}/chart.webp", "--output", str(tmp_path / "out"),
        "--tasks", "caption,detect", "--structured_output", "off",
    )
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    results = pq.read_table(tmp_path / "out" / "results").to_pylist()
    assert sorted(r["task"] for r in results) == ["caption", "caption"]
    # Captions climb the text ladder only when degenerate (the random model's often run to max_tokens).
    assert all((r["attempts"] > 1) == ("retried" in r["quality_flags"]) for r in results)
    assert [(e["task"], e["stage"]) for e in errors] == [("detect", "parse")] * 2
    # Which of the two depends on whether the random model stopped before max_tokens (CPU-dependent).
    assert {e["error_type"] for e in errors} <= {"DetectionParseError", "CutOffAnswer"}
    for error in errors:
        assert "after 3 attempts" in error["message"] and error["raw_output"]
    caption_retries = sum(r["attempts"] - 1 for r in results)
    assert summary["counts"]["retries"] == 2 * 2 + caption_retries and summary["accounting"]["balanced"]


def test_engine_failure_mid_bundle_is_retried_without_duplicates_or_gaps(tmp_path, monkeypatch):
    from vllm.v1.engine.llm_engine import LLMEngine

    original_step = LLMEngine.step
    state = {"steps": 0, "fired": False}

    def step_that_fails_once(self):
        state["steps"] += 1
        if not state["fired"] and state["steps"] == 6:
            state["fired"] = True
            raise RuntimeError("injected engine fault")
        return original_step(self)

    monkeypatch.setattr(LLMEngine, "step", step_that_fails_once)
    inputs = tmp_path / "in"
    copy_samples(inputs)
    # The bundle-based DirectRunner retries a failed bundle, as Dataflow does
    # (the FnApiRunner used for plain local runs does not retry).
    summary = run_pipeline(
        "--input", f"{inputs}/*", "--output", str(tmp_path / "out"), "--runner", "BundleBasedDirectRunner",
    )
    assert state["fired"], "the fault was injected"
    results = pq.read_table(tmp_path / "out" / "results").to_pylist()
    keys = collections.Counter((r["item_id"], r["task"]) for r in results)
    assert set(keys.values()) == {1}, "no duplicates"
    assert len(keys) == 8 * 3, "no gaps"
    assert pq.read_table(tmp_path / "out" / "errors").num_rows == 0
    assert summary["accounting"]["balanced"]
