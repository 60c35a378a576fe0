"""Per-request isolation on the real engine (every architecture end to end: tests/test_gemma4_families.py)."""
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


def test_preprocessing_on_the_submitting_thread_keeps_isolation_and_prefix_reuse(tiny_checkpoint):
    """The TPU profiles preprocess on Beam's threads (cpu-tiny, used elsewhere, on the step loop)."""
    from PIL import Image

    from pipelines.checkpoint_shape import CheckpointShape
    from pipelines.engine_profiles import resolve
    from transforms.engine import ENGINES, EngineSettings
    from transforms.builtin_tasks import BUILTIN_TASKS
    from transforms.metadata import ItemValues
    from transforms.tasks import with_overrides

    settings = EngineSettings(
        model_path=str(tiny_checkpoint),
        engine_args=resolve("cpu-tiny", {"max_model_len": 256}, CheckpointShape.read(str(tiny_checkpoint))).engine_args,
        max_in_flight=8, structured_output=True, preprocess_on_step_thread=False,
    )
    engine = ENGINES.acquire(settings)
    specs = [with_overrides(BUILTIN_TASKS[name], max_tokens=4).request(ItemValues(None)) for name in ("caption", "ocr", "caption")]
    image = Image.effect_noise((320, 240), 64).convert("RGB")
    futures = engine.submit(image, "noise-320x240", specs)
    caption, ocr, again = (f.exception(timeout=120) or f.result() for f in futures)
    assert "longer than" in str(ocr) or "max_model_len" in str(ocr)  # rejected alone
    # Same prompt, same image, greedy: the same answer (the random model may stop before 4 tokens).
    assert (caption.text, caption.generated_tokens) == (again.text, again.generated_tokens)
    assert 1 <= caption.generated_tokens <= 4
    # One of the two took the image's KV from the cache: of its 183 tokens, ~72 are the image's,
    # so a hit of 128 or more (4 blocks of 32) cannot be the system prompt alone.
    assert caption.prompt_tokens == again.prompt_tokens < 128 + 72
    assert max(caption.cached_tokens, again.cached_tokens) >= 128
    assert engine.busy_seconds > 0 and not engine.failed
