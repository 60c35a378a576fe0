"""Context length and image budgets from the work: every profile holds every built-in task's longest request.

The prompt is rendered and counted with a real Gemma 4 chat template and tokenizer (the tiny
checkpoints': byte-level vocabularies, so they count more tokens per character than Google's);
the engine's planned `max_model_len` must hold it with the image's soft tokens and the largest
`max_tokens` (thinking's budget included). vLLM would otherwise stop an answer at the length limit
and keep it as an ordinary row.
"""
from __future__ import annotations

import dataclasses

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from configuration.options import UsageError, plan_engine, validate
from engine import profiles as engine_profiles
from engine.checkpoint_shape import CheckpointShape
from engine.prompts import build_messages
from launch import plan as launch_plan
from launch import submit
from launch.profiles import PROFILES as LAUNCH_PROFILES
from launch.profiles import check_engine_fits
from tasks.builtin import BUILTIN_TASKS, PAGE_TASKS
from tests.launch_support import DEPLOYMENT_FLAGS, USER_ARGS, go_offline

ALL_TASKS = ",".join(BUILTIN_TASKS)


def request(profile: str, thinking: bool, *extra: str):
    return validate(PipelineOptions([
        "--output", "out", "--input", "a", "--engine_profile", profile, "--tasks", ALL_TASKS,
        "--thinking", "on" if thinking else "off", *extra,
    ]), local_paths=False)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    from tiny_model.checkpoint import ensure_checkpoint

    path = ensure_checkpoint("tiny-e2b")
    return AutoTokenizer.from_pretrained(str(path)), CheckpointShape.read(str(path))


def rendered_tokens(tokenizer, instruction: str, thinking: bool) -> int:
    text = tokenizer.apply_chat_template(build_messages(instruction), tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("profile", sorted(engine_profiles.PROFILES))
def test_every_profile_plans_a_context_that_holds_every_builtin_tasks_longest_request(tiny, profile, thinking):
    tokenizer, shape = tiny
    plan = plan_engine(request(profile, thinking), shape)
    length = plan.profile.engine_args["max_model_len"]
    longest_prompt = max(
        rendered_tokens(tokenizer, task.instruction, thinking) + (task.vision_tokens or shape.vision_tokens)
        for task in plan.tasks
    )
    largest_answer = max(task.max_tokens for task in plan.tasks)
    assert largest_answer >= max(task.max_tokens for task in BUILTIN_TASKS.values()) + (1024 if thinking else 0)
    assert length >= longest_prompt + largest_answer, (profile, thinking, length, longest_prompt, largest_answer)
    # The KV planning follows the length: the `cpu` profile sizes its pool for the planned sequences.
    if profile == "cpu":
        args = plan.profile.engine_args
        assert args["kv_cache_memory_bytes"] == args["max_num_seqs"] * shape.kv_bytes_per_sequence(
            length, 2 if args["dtype"] == "bfloat16" else 4, windowed=True)


def test_a_context_length_the_user_set_too_short_is_refused_naming_the_options():
    with pytest.raises(UsageError, match=r"--engine_arg max_model_len=4096: this job needs up to \d+ tokens per request: "
                                         r"the longest prompt, .*plus the largest max_tokens, layout's 7232.*--max_tokens"):
        plan_engine(request("tpu-v6e-1-gemma4-12b", True, "--engine_arg", "max_model_len=4096"))
    # Long enough: kept as given.
    assert plan_engine(request("cpu-tiny", False, "--engine_arg", "max_model_len=16384")).profile.engine_args[
        "max_model_len"] == 16384


def test_a_fixed_kv_pool_too_small_for_the_planned_length_is_refused(tiny):
    _, shape = tiny
    with pytest.raises(UsageError, match="its pool holds 1 MiB; lower --max_tokens TASK=N"):
        plan_engine(request("cpu-tiny", False, "--engine_arg", f"kv_cache_memory_bytes={2**20}"), shape)


@pytest.mark.parametrize("profile", sorted(LAUNCH_PROFILES))
def test_page_tasks_read_at_the_dense_page_budget_on_every_accelerator_and_the_memory_fits(profile):
    """TPU profiles included: tpu-inference serves budgets above 280 whole (engine/profiles.py, _tpu_profile)."""
    launch = LAUNCH_PROFILES[profile]
    plan = plan_engine(request(launch.engine_profile, False))
    budgets = {task.name: task.vision_tokens for task in plan.tasks}
    assert {budgets[name] for name in PAGE_TASKS} == {1120} and budgets["caption"] in (None, 280)
    assert plan.largest_vision_tokens == 1120
    check_engine_fits(launch.worker, dataclasses.replace(plan.profile, vision_tokens=plan.largest_vision_tokens))
    # A job's own budget holds for every task.
    assert {task.vision_tokens for task in plan_engine(request(launch.engine_profile, False, "--vision_tokens", "280")).tasks} == {280}
    # The planner shows the memory fit of the longest request, thinking on.
    fit = launch_plan.memory_fit(launch, ALL_TASKS, thinking=True)
    held = int(fit.split(" hold ")[1].split()[0])
    assert held >= 1 and "DOES NOT FIT" not in fit and "ocr 1120" in fit


def test_the_tpu_encoder_jit_path_is_refused_above_the_checkpoints_default_budget():
    launch = LAUNCH_PROFILES["tpu-v6e-1"]
    engine = engine_profiles.resolve(launch.engine_profile, {"compilation_config": {"cudagraph_mm_encoder": True}})
    check_engine_fits(launch.worker, dataclasses.replace(engine, vision_tokens=280))
    with pytest.raises(ValueError, match="cuts each image to 280 soft tokens.*default_output_length"):
        check_engine_fits(launch.worker, dataclasses.replace(engine, vision_tokens=1120))
    raised = engine_profiles.resolve(launch.engine_profile, {
        "compilation_config": {"cudagraph_mm_encoder": True}, "hf_overrides": {"vision_config": {"default_output_length": 1120}}})
    check_engine_fits(launch.worker, dataclasses.replace(raised, vision_tokens=1120))


def test_the_dry_run_prints_the_engine_the_workers_will_resolve(monkeypatch, tmp_path, capsys):
    go_offline(monkeypatch, tmp_path)
    argv = ["--profile", "tpu-v6e-1", *USER_ARGS, *DEPLOYMENT_FLAGS, "--tasks", "ocr,markdown", "--thinking", "on", "--dry-run"]
    assert submit.main(argv) == 0
    engine = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# workers' engine: ")]
    text = "\n".join(engine)
    assert "engine profile tpu-v6e-1-gemma4-12b: max_model_len 7168 (needed " in text and "thinking's budget included" in text
    assert "image budgets: ocr 1120, markdown 1120; the engine is planned for 1120" in text
    assert "host_feeders 1; max_in_flight 48 per worker process; structured output off; thinking on" in text
    assert '"max_model_len": 7168' in text and '"mm_processor_kwargs": {"max_soft_tokens": 1120}' in text
