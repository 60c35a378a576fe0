"""Prompt building without an engine."""
import pytest

from transforms.prompts import (
    DEFAULT_TASKS,
    SYSTEM_PROMPT,
    TASKS,
    build_messages,
    parse_task_list,
    render_prompts,
    sampling_kwargs,
    with_max_tokens,
)


def test_messages_are_system_then_image_then_instruction():
    messages = build_messages(TASKS["ocr"])
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}
    assert messages[1]["role"] == "user"
    assert messages[1]["content"][0] == {"type": "image"}
    assert messages[1]["content"][1] == {"type": "text", "text": TASKS["ocr"].instruction}


def test_text_first_ablation_moves_the_image_after_the_instruction():
    content = build_messages(TASKS["caption"], image_first=False)[1]["content"]
    assert [part["type"] for part in content] == ["text", "image"]


def fake_template(messages):
    """Stands in for a chat template: enough to show prompts differ only after the image."""
    parts = []
    for message in messages:
        for part in message["content"]:
            parts.append("<IMG>" if part["type"] == "image" else part["text"])
    return "|".join(parts)


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

