"""Every tiny Gemma 4 architecture end to end on the real engine, plus thinking mode and the `cpu` profile.

One pipeline run (one engine) per architecture on two small images; the random
weights' text is never asserted, only what the pipeline guarantees for any answer.
"""
from __future__ import annotations

import dataclasses

import pathlib

import pyarrow.parquet as pq
import pytest

from engine.prompts import prompt_version
from schemas.tables import RESULTS_SCHEMA
from tasks.builtin import DEFAULT_TASKS
from tasks.kinds.text import LONGER_ANSWER_SCALE
from tests.conftest import SAMPLES, run_pipeline
from tiny_model.checkpoint import DEFAULT_PRESET

pytestmark = pytest.mark.engine  # every test here starts the vLLM engine (the fast tier skips them)

ITEMS = ("receipt.png", "chart.webp")
MARKERS = ("<|channel>", "<channel|>", "<turn|>")


def run_family(tmp_path: pathlib.Path, preset: str, *extra: str) -> tuple[dict, list[dict]]:
    inputs = [arg for name in ITEMS for arg in ("--input", str(SAMPLES / name))]
    summary = run_pipeline(*inputs, "--output", str(tmp_path / "out"), "--tiny_preset", preset, *extra)
    rows = pq.read_table(tmp_path / "out" / "results", schema=RESULTS_SCHEMA).to_pylist()
    return summary, rows


def assert_complete(summary: dict, rows: list[dict], preset: str, thinking: bool = False) -> None:
    assert preset in summary["model"]["id"] and summary["model"]["random_weights"] is True
    assert summary["accounting"]["balanced"] is True
    errors = summary["counts"]["error_rows"]
    assert len(rows) + errors == len(ITEMS) * len(DEFAULT_TASKS)
    assert summary["counts"].get("error_rows_by_stage", {}).keys() <= {"parse"}  # only the random detections
    assert {row["task"] for row in rows} >= {"ocr", "caption"}
    for row in rows:
        # Whatever the model emits, a thought or an end-of-turn marker never reaches the answer.
        assert not any(marker in (row["text"] or "") for marker in MARKERS), row["text"]
        assert row["prompt_version"] == prompt_version(thinking)
        assert row["prompt_tokens"] > 0 and row["generated_tokens"] > 0
    # The second and third task of an image reuse its prefix (system + image) from the first.
    assert any(row["cached_tokens"] > 0 for row in rows)


@pytest.mark.parametrize(
    "preset, extra",
    [
        ("tiny-e2b", ()),
        ("tiny-26b-a4b", ()),
        ("tiny-31b", ("--vision_tokens", "140")),  # a budget above the checkpoint's 70, planned by the engine
        ("tiny-12b-unified", ()),
    ],
)
def test_every_architecture_runs_the_pipeline_on_the_real_engine(tmp_path, private_model_cache, preset, extra):
    summary, rows = run_family(tmp_path, preset, *extra)
    assert_complete(summary, rows, preset)


def test_the_engine_keeps_thought_markers_in_its_text(tiny_checkpoint):
    """What the split relies on: with the pipeline's sampling parameters vLLM's text keeps <|channel>/<channel|>.

    The model is made to emit exactly those tokens (allowed_token_ids); with vLLM's default
    skip_special_tokens=True the same tokens decode to nothing, and a thought could not be told
    from an answer.
    """
    from vllm import LLM
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    from engine.api import EngineSettings
    from engine.checkpoint_shape import CheckpointShape
    from engine.local import sampling_params
    from engine.process import prepare_process
    from engine.profiles import resolve
    from library.metadata import ItemValues
    from tasks.builtin import BUILTIN_TASKS

    args = resolve("cpu-tiny", checkpoint=CheckpointShape.read(str(tiny_checkpoint))).engine_args
    settings = EngineSettings(model_path=str(tiny_checkpoint), engine_args=args, max_in_flight=1, structured_output=False)
    prepare_process(settings)
    llm = LLM(model=str(tiny_checkpoint), **args)
    markers = llm.get_tokenizer().convert_tokens_to_ids(["<|channel>", "<channel|>"])
    ours = sampling_params(BUILTIN_TASKS["caption"].request(ItemValues(None)), settings).clone()
    ours.max_tokens, ours.allowed_token_ids, ours.output_kind = 6, markers, RequestOutputKind.FINAL_ONLY
    default = ours.clone()
    default.skip_special_tokens = True
    kept, dropped = (llm.generate(["<bos>hello"], params)[0].outputs[0] for params in (ours, default))
    assert kept.text and set(kept.text.replace("<|channel>", "").replace("<channel|>", "")) == set()
    assert len(kept.token_ids) == len(dropped.token_ids) > 0 and dropped.text == ""

    # A schema-constrained request with thinking off bans the markers (engine.sampling_params): the same
    # choice between the markers and one ordinary token now always takes the ordinary one.
    constrained = dataclasses.replace(settings, structured_output=True)
    banned = sampling_params(BUILTIN_TASKS["detect"].request(ItemValues(None)), constrained, None, markers)
    assert banned.logit_bias == {markers[0]: -100.0, markers[1]: -100.0}
    thinking = dataclasses.replace(constrained, thinking=True)
    assert sampling_params(BUILTIN_TASKS["detect"].request(ItemValues(None)), thinking, None, markers).logit_bias is None
    ordinary = llm.get_tokenizer().convert_tokens_to_ids("a")
    probe = SamplingParams(max_tokens=6, temperature=0.0, allowed_token_ids=[*markers, ordinary],
                           logit_bias=banned.logit_bias, skip_special_tokens=False)
    free = llm.generate(["<bos>hello"], probe)[0].outputs[0]
    assert free.token_ids and set(free.token_ids) == {ordinary}


def test_thinking_on_the_cpu_profile_keeps_thoughts_out_of_answers(tmp_path, private_model_cache):
    """`cpu` (sized from the checkpoint and this machine) runs the E-series; thinking adds its budget and version."""
    summary, rows = run_family(tmp_path, DEFAULT_PRESET, "--engine_profile", "cpu", "--thinking", "on")
    assert_complete(summary, rows, DEFAULT_PRESET, thinking=True)
    config = summary["config"]
    assert config["thinking"] is True
    assert config["engine_args"]["structured_outputs_config"]["reasoning_parser"] == "gemma4_thinking"
    assert 1 <= config["engine_args"]["max_num_seqs"] <= 64 and config["engine_args"]["kv_cache_memory_bytes"] > 0
    assert config["engine_args"]["disable_hybrid_kv_cache_manager"] is False  # KV-shared layers need it
    # Within the task's budget; a degenerate text answer's last rung had up to twice it (tasks/kinds/text.py).
    assert all(row["generated_tokens"] <= config["max_tokens"][row["task"]] * (LONGER_ANSWER_SCALE if row["attempts"] == 3 else 1)
               for row in rows)
