"""The pipeline's prompts against Google's own Gemma 4 chat templates, family by family.

Google's templates (verbatim fixtures, provenance in tests/fixtures/gemma4_templates/SOURCES.md)
are rendered through transformers' `apply_chat_template`, the path vLLM renders a real
checkpoint's template with. The tiny checkpoints' own templates must render every pipeline
prompt exactly as their family's current Google template does.
"""
from __future__ import annotations

import pathlib

import pytest

from engine.prompts import SYSTEM_PROMPT, build_messages, render_prompt
from library.metadata import ItemValues
from tasks.builtin import BUILTIN_TASKS, DEFAULT_TASKS
from tiny_model.checkpoint import PRESETS, ensure_checkpoint

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "gemma4_templates"
SMALL = ("small-2026-04-02.jinja2", "small-2026-07-14.jinja2")  # E2B/E4B
LARGE = ("large-2026-04-10.jinja2", "large-2026-07-14.jinja2")  # 26B-A4B, 31B, 12B
CURRENT = {False: "small-2026-07-14.jinja2", True: "large-2026-07-14.jinja2"}  # by Preset.empty_thought_channel
FAMILY_PRESETS = ("tiny-e2b", "tiny-26b-a4b", "tiny-31b", "tiny-12b-unified")
INSTRUCTIONS = {name: BUILTIN_TASKS[name].request(ItemValues(None)).instruction for name in DEFAULT_TASKS}


def render_prompts(template, image_first: bool = True, thinking: bool = False) -> dict[str, str]:
    return {name: render_prompt(text, template, image_first, thinking) for name, text in INSTRUCTIONS.items()}


@pytest.fixture(scope="module")
def tokenizer():
    """Any tiny checkpoint's tokenizer: it holds Gemma 4's special tokens (<bos> renders as in Google's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_checkpoint("tiny-e2b"))


def google(tokenizer, name: str):
    """`apply_chat_template` with one of Google's templates instead of the tokenizer's own."""
    template = (FIXTURES / name).read_text()
    return lambda messages, **kwargs: tokenizer.apply_chat_template(messages, chat_template=template, **kwargs)


def generation_prompt(large: bool, thinking: bool) -> str:
    # Thinking off: the large models' templates open and close an empty thought channel; the E-series' do not
    # (ollama#15560, "Gemma 4 prompts differ when thinking is disabled": 26b/31b emit an empty thought block).
    return "<|turn>model\n" + ("<|channel>thought\n<channel|>" if large and not thinking else "")


@pytest.mark.parametrize("name", SMALL + LARGE)
@pytest.mark.parametrize("thinking", [False, True])
def test_google_templates_render_the_pipeline_prompts_as_intended(tokenizer, name, thinking):
    prompts = render_prompts(google(tokenizer, name), thinking=thinking)
    system_open = "<bos><|turn>system\n" + ("<|think|>" if thinking else "")
    for task, instruction in INSTRUCTIONS.items():
        prompt = prompts[task]
        assert prompt.startswith(system_open)
        # The system text as written, not a Python repr of a list of parts.
        assert f"{SYSTEM_PROMPT}<turn|>\n<|turn>user\n" in prompt
        assert "[{" not in prompt and "'type'" not in prompt
        # One image, after the system turn and before the instruction.
        assert prompt.count("<|image|>") == 1
        assert prompt.index(SYSTEM_PROMPT) < prompt.index("<|image|>") < prompt.index(instruction)
        assert prompt.endswith(f"{instruction}<turn|>\n" + generation_prompt(name in LARGE, thinking))
    # The tasks of an image share everything through the image (the prefix vLLM caches).
    through_image = {p[: p.index("<|image|>") + len("<|image|>")] for p in prompts.values()}
    assert len(through_image) == 1


@pytest.mark.parametrize("name", ("small-2026-04-02.jinja2", "large-2026-04-10.jinja2"))
def test_a_system_prompt_given_as_parts_reaches_older_templates_as_a_python_repr(tokenizer, name):
    """Why build_messages sends the system prompt as a string: these templates print `content | trim`."""
    messages = build_messages(INSTRUCTIONS["ocr"])
    messages[0] = {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}
    rendered = google(tokenizer, name)(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert "[{'type': 'text', 'text': 'You are" in rendered


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("image_first", [True, False])
def test_each_tiny_checkpoint_renders_exactly_as_its_familys_google_template(tokenizer, preset, thinking, image_first):
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(ensure_checkpoint(preset)).apply_chat_template
    reference = google(tokenizer, CURRENT[PRESETS[preset].empty_thought_channel])
    assert render_prompts(own, image_first, thinking) == render_prompts(reference, image_first, thinking)


def test_each_family_has_the_generation_prompt_its_google_template_has():
    assert [PRESETS[p].empty_thought_channel for p in FAMILY_PRESETS] == [False, True, True, True]
