"""Prompt building without an engine."""
import pytest

from transforms.prompts import (
    DEFAULT_TASKS,
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    TASKS,
    THINKING_BUDGET,
    build_messages,
    parse_task_list,
    prompt_version,
    render_prompts,
    sampling_kwargs,
    with_max_tokens,
    with_thinking_budget,
)


def test_messages_are_system_then_image_then_instruction():
    messages = build_messages(TASKS["ocr"])
    # A string: Google's templates print the system content as-is (`| trim`), a list as its Python repr.
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert messages[1]["role"] == "user"
    assert messages[1]["content"][0] == {"type": "image"}
    assert messages[1]["content"][1] == {"type": "text", "text": TASKS["ocr"].instruction}


def test_text_first_ablation_moves_the_image_after_the_instruction():
    content = build_messages(TASKS["caption"], image_first=False)[1]["content"]
    assert [part["type"] for part in content] == ["text", "image"]


def fake_template(messages, *, tokenize, add_generation_prompt, enable_thinking):
    """Stands in for a chat template: enough to show prompts differ only after the image."""
    assert tokenize is False and add_generation_prompt is True
    parts = ["THINK" if enable_thinking else "NO-THINK", messages[0]["content"]]
    for message in messages[1:]:
        for part in message["content"]:
            parts.append("<IMG>" if part["type"] == "image" else part["text"])
    return "|".join(parts)


def test_thinking_is_passed_to_the_template_explicitly():
    assert render_prompts([TASKS["ocr"]], fake_template)["ocr"].startswith("NO-THINK|")
    assert render_prompts([TASKS["ocr"]], fake_template, thinking=True)["ocr"].startswith("THINK|")


def test_thinking_adds_its_budget_and_its_own_prompt_version():
    assert with_thinking_budget(TASKS["caption"], True).max_tokens == TASKS["caption"].max_tokens + THINKING_BUDGET
    assert with_thinking_budget(TASKS["caption"], False) is TASKS["caption"]
    assert prompt_version(False) == PROMPT_VERSION and prompt_version(True) != PROMPT_VERSION


def test_sampled_requests_use_the_checkpoints_top_k_and_top_p():
    generation_config = {"temperature": 1.0, "top_k": 64, "top_p": 0.95}  # Google's generation_config.json
    sampled = TASKS["detect"].retries[0].apply(TASKS["detect"])
    assert sampled.temperature > 0
    assert {"top_k": 64, "top_p": 0.95}.items() <= sampling_kwargs(sampled, model_defaults=generation_config).items()
    assert sampling_kwargs(sampled, model_defaults=generation_config)["temperature"] == sampled.temperature
    greedy = sampling_kwargs(TASKS["detect"], model_defaults=generation_config)
    assert "top_k" not in greedy and greedy["temperature"] == 0.0


def test_all_tasks_share_the_prefix_up_to_and_including_the_image():
    prompts = render_prompts([TASKS[name] for name in DEFAULT_TASKS], fake_template)
    prefixes = {prompt[: prompt.index("<IMG>") + len("<IMG>")] for prompt in prompts.values()}
    assert len(prefixes) == 1
    assert len(set(prompts.values())) == len(DEFAULT_TASKS)


def test_task_list_parsing():
    assert parse_task_list("ocr, detect,ocr") == ("ocr", "detect")
    with pytest.raises(ValueError, match="unknown task"):
        parse_task_list("ocr,translate")
    with pytest.raises(ValueError, match="no task"):
        parse_task_list(" , ")


def test_sampling_is_greedy_for_ocr_and_detect_and_overridable():
    for name in ("ocr", "detect"):
        assert sampling_kwargs(TASKS[name])["temperature"] == 0.0
    assert with_max_tokens(TASKS["ocr"], {"ocr": 12}).max_tokens == 12
    assert with_max_tokens(TASKS["caption"], {"ocr": 12}) is TASKS["caption"]


def test_only_detect_is_constrained_to_json():
    assert TASKS["detect"].json_schema is not None and TASKS["detect"].produces_boxes
    assert TASKS["ocr"].json_schema is None and TASKS["caption"].json_schema is None

