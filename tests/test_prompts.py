"""Prompt building without an engine."""
from engine.prompts import PROMPT_VERSION, SYSTEM_PROMPT, Sampling, build_messages, prompt_version, render_prompt, sampling_kwargs
from library.metadata import ItemValues
from tasks.builtin import BUILTIN_TASKS, DEFAULT_TASKS

OCR = BUILTIN_TASKS["ocr"].request(ItemValues(None)).instruction


def test_messages_are_system_then_image_then_instruction():
    messages = build_messages(OCR)
    # A string: Google's templates print the system content as-is (`| trim`), a list as its Python repr.
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert messages[1]["role"] == "user"
    assert messages[1]["content"][0] == {"type": "image"}
    assert messages[1]["content"][1] == {"type": "text", "text": OCR}


def test_text_first_ablation_moves_the_image_after_the_instruction():
    content = build_messages(OCR, image_first=False)[1]["content"]
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
    assert render_prompt(OCR, fake_template).startswith("NO-THINK|")
    assert render_prompt(OCR, fake_template, thinking=True).startswith("THINK|")
    assert prompt_version(False) == PROMPT_VERSION and prompt_version(True) != PROMPT_VERSION


def test_sampled_requests_use_the_tasks_then_the_checkpoints_top_k_and_top_p():
    generation_config = {"temperature": 1.0, "top_k": 64, "top_p": 0.95}  # Google's generation_config.json
    sampled = sampling_kwargs(Sampling(temperature=0.7), 64, model_defaults=generation_config)
    assert sampled == {"max_tokens": 64, "temperature": 0.7, "seed": 0, "top_k": 64, "top_p": 0.95}
    own = sampling_kwargs(Sampling(temperature=0.7, top_k=5), 64, model_defaults=generation_config)
    assert (own["top_k"], own["top_p"]) == (5, 0.95)
    greedy = sampling_kwargs(Sampling(top_k=5), 64, model_defaults=generation_config)
    assert "top_k" not in greedy and "top_p" not in greedy and greedy["temperature"] == 0.0


def test_all_tasks_share_the_prefix_up_to_and_including_the_image():
    prompts = [render_prompt(BUILTIN_TASKS[name].request(ItemValues(None)).instruction, fake_template) for name in DEFAULT_TASKS]
    prefixes = {prompt[: prompt.index("<IMG>") + len("<IMG>")] for prompt in prompts}
    assert len(prefixes) == 1
    assert len(set(prompts)) == len(DEFAULT_TASKS)
