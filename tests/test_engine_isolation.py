"""Per-request isolation on the real engine (every architecture end to end: tests/test_gemma4_families.py)."""
from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq
import pytest


from tests.conftest import copy_samples, run_pipeline

pytestmark = pytest.mark.engine  # every test here starts the vLLM engine (the fast tier skips them)


def test_a_request_the_engine_rejects_fails_only_its_own_task(tmp_path, private_model_cache):
    inputs = tmp_path / "in"
    copy_samples(inputs)
    # The engine's context is planned for the instructions as written (configuration/options.py), so a
    # prompt too long for it comes from an item's own values: a task quoting each item's long notes
    # (~6,000 words, more tokens than cpu-tiny's 4,096) is rejected by the engine; caption still runs.
    notes = "word " * 6000
    manifest = tmp_path / "items.csv"
    manifest.write_text(f"uri,notes\n{inputs}/receipt.png,{notes}\n{inputs}/chart.webp,{notes}\n")
    task_file = tmp_path / "tasks.yaml"
    task_file.write_text('tasks:\n  - name: quote\n    instruction: "Compare the image with: {notes}"\n    max_tokens: 8\n')
    summary = run_pipeline(
        "--manifest", str(manifest), "--task_file", str(task_file), "--tasks", "caption,quote",
        "--output", str(tmp_path / "out"),
    )
    results = pq.read_table(tmp_path / "out" / "results").to_pylist()
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert sorted(r["task"] for r in results) == ["caption", "caption"]
    assert sorted(e["task"] for e in errors) == ["quote", "quote"]
    assert {e["stage"] for e in errors} == {"engine"}
    assert all("maximum context length" in e["message"] for e in errors), [e["message"] for e in errors]
    assert summary["accounting"]["balanced"] and summary["counts"]["error_rows_by_stage"] == {"engine": 2}


def test_preprocessing_on_the_submitting_thread_keeps_isolation_and_prefix_reuse(tiny_checkpoint):
    """The TPU profiles preprocess on Beam's threads (cpu-tiny, used elsewhere, on the step loop)."""
    from PIL import Image

    from engine.api import EngineSettings
    from engine.checkpoint_shape import CheckpointShape
    from engine.profiles import resolve
    from engine.registry import ENGINES

    settings = EngineSettings(
        model_path=str(tiny_checkpoint),
        engine_args=resolve("cpu-tiny", {"max_model_len": 256}, CheckpointShape.read(str(tiny_checkpoint))).engine_args,
        max_in_flight=8, structured_output=True, preprocess_on_step_thread=False,
    )
    engine = ENGINES.acquire(settings)
    specs = _requests(("caption", "ocr", "caption"))
    image = Image.effect_noise((320, 240), 64).convert("RGB")
    futures = engine.submit(image, "noise-320x240", specs)
    caption, ocr, again = (f.exception(timeout=120) or f.result() for f in futures)
    assert "longer than" in str(ocr) or "max_model_len" in str(ocr)  # rejected alone
    # Same prompt, same image: both answered (their text is not compared: the one computed on cached
    # KV runs other matrix shapes, and a greedy near-tie of random weights may round the other way).
    assert 1 <= caption.generated_tokens <= 4 and 1 <= again.generated_tokens <= 4
    # One of the two took the image's KV from the cache: of its 183 tokens, ~72 are the image's,
    # so a hit of 128 or more (4 blocks of 32) cannot be the system prompt alone.
    assert caption.prompt_tokens == again.prompt_tokens < 128 + 72
    assert max(caption.cached_tokens, again.cached_tokens) >= 128
    assert engine.busy_seconds > 0 and not engine.failed


# A constrained answer that cannot end before max_tokens (structured output allows no end-of-sequence
# before the grammar's end): a request that is surely still running a few steps after it starts.
UNENDING = {"type": "string", "minLength": 1000}


def _tiny_settings(tiny_checkpoint, **engine_args):
    from engine.api import EngineSettings
    from engine.checkpoint_shape import CheckpointShape
    from engine.profiles import resolve

    profile = resolve("cpu-tiny", engine_args, CheckpointShape.read(str(tiny_checkpoint)))
    return EngineSettings(model_path=str(tiny_checkpoint), engine_args=profile.engine_args, max_in_flight=8,
                          structured_output=True, preprocess_on_step_thread=True)


def _requests(names, max_tokens=4):
    """The built-in tasks' engine requests for an item without metadata, each capped at `max_tokens`."""
    from library.metadata import ItemValues
    from tasks.builtin import BUILTIN_TASKS
    from tasks.task import with_overrides

    return [with_overrides(BUILTIN_TASKS[name], max_tokens=max_tokens).request(ItemValues(None)) for name in names]


def _answers(engine, images, specs):
    """Each task of each image alone, one after the other: the same batches (of one) on any engine."""
    answers = []
    for key, image in images.items():
        for spec in specs:
            [future] = engine.submit(image, key, [spec])
            error = future.exception(timeout=120)
            answers.append(repr(type(error)) if error else dataclasses.astuple(future.result())[:5])  # text .. cached
    return answers


def _images():
    """Two seeded noise images by key (the key names the pixels, as a content hash would)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    return {f"noise-{w}x{h}": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((320, 240), (200, 300))}


def test_tasks_of_an_image_share_its_preprocessing(tiny_checkpoint):
    """One preprocessing per image for all its tasks, with the same answers as preprocessing per task."""
    from engine.registry import ENGINES

    specs = _requests(("ocr", "caption", "detect"))
    shared = ENGINES.acquire(_tiny_settings(tiny_checkpoint))
    before = shared.preprocessing()
    shared_answers = _answers(shared, _images(), specs)
    after = shared.preprocessing()
    assert (after.requests - before.requests, after.images - before.images) == (6, 2)

    per_task = ENGINES.acquire(_tiny_settings(tiny_checkpoint, mm_processor_cache_gb=0))
    before = per_task.preprocessing()
    assert _answers(per_task, _images(), specs) == shared_answers
    after = per_task.preprocessing()
    assert (after.requests - before.requests, after.images - before.images) == (6, 6)
    # The image's later tasks took its KV from the prefix cache (cached_tokens is the 5th field).
    assert all(answer[4] > 0 for answer in shared_answers[1:3] + shared_answers[4:6])


@pytest.fixture(scope="module")
def _separate_cores(tiny_checkpoint):
    engines = []
    yield engines
    for engine in engines:
        engine.close()


@pytest.fixture
def separate_core(tiny_checkpoint, _separate_cores):
    """An engine whose vLLM engine core runs in its own process (the accelerator profiles' placement).

    Shared by this module's tests while it lives; a test that kills its core leaves the next one a new
    engine, so the tests pass in any order.
    """
    from engine.registry import build_engine

    if not _separate_cores or _separate_cores[-1].failed:
        settings = dataclasses.replace(_tiny_settings(tiny_checkpoint, max_model_len=256), engine_core_process=True)
        _separate_cores.append(build_engine(settings))
    return _separate_cores[-1]


def test_engine_core_in_its_own_process_answers_as_in_process(tiny_checkpoint, separate_core):
    """Same answers, same isolation of a rejected request, shared preprocessing."""
    from engine.registry import ENGINES

    # A 256-token context rejects the OCR and detect prompts (see the first test), not the caption.
    specs = _requests(("caption", "ocr", "caption"))
    in_process = _answers(ENGINES.acquire(_tiny_settings(tiny_checkpoint, max_model_len=256)), _images(), specs)
    assert _answers(separate_core, _images(), specs) == in_process
    assert separate_core.preprocessing().images == 2  # shared across the image's tasks there too
    assert in_process[1] == in_process[4] and "Error" in in_process[1]  # the OCR requests, rejected alone
    assert in_process[0][2] == in_process[2][2] and in_process[2][4] > 0  # the repeat hit the prefix cache


def test_a_dead_engine_core_process_fails_the_requests_instead_of_hanging(separate_core):
    """The engine-core process killed (OOM killer, a crashed runtime): every request fails with
    EngineDeadError, which fails the bundle for a retry, rather than waiting forever."""
    import os
    import signal

    from engine import vllm_internals
    from engine.api import Constraint, EngineDeadError

    image_key, image = next(iter(_images().items()))
    [caption] = _requests(("caption",), max_tokens=64)
    # 64 steps still running when the core dies, whatever the random weights: the schema forbids an
    # end-of-sequence before 1,000 characters (a model could otherwise stop after one token).
    caption = dataclasses.replace(caption, constraint=Constraint(json_schema=UNENDING))
    [running] = separate_core.submit(image, image_key, [caption])
    [core] = vllm_internals.core_processes(separate_core._engine)
    # Spawned, not forked beside this process's threads (engine/process.py; issue 20).
    assert type(core).__name__ == "SpawnProcess"
    os.kill(core.pid, signal.SIGKILL)
    assert isinstance(running.exception(timeout=60), EngineDeadError)  # raises TimeoutError if it hangs
    assert separate_core.failed
    with pytest.raises(EngineDeadError):  # later submissions fail at once: the runner retries the bundle
        separate_core.submit(image, image_key, [caption])
