"""Prompts and sampling: how a task's instruction becomes the engine's prompt text and sampling settings.

Pure functions only (no engine, no Beam), so prompt building is unit-tested
without a model. Every prompt is `[system][image][task instruction]`: the
tasks of one image then share the system + image prefix token for token, and
vLLM's prefix cache computes the image's KV once per image instead of once
per task. What each task asks is its own definition (`tasks.task`).

Bump PROMPT_VERSION whenever the system prompt, the message layout or a
built-in task's instruction changes: it is written to every row, and with
the task fingerprint (`tasks.task.TaskFingerprints`) it is part of the
incremental-run key, so a new version re-processes old items.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Protocol

PROMPT_VERSION = "v3-2026-11-30"

# Gemma 4's image soft-token budgets: the only values its image processor and vLLM's
# (vllm/model_executor/models/gemma4_mm.py _SUPPORTED_SOFT_TOKENS) accept.
VISION_TOKEN_BUDGETS: tuple[int, ...] = (70, 140, 280, 560, 1120)

# Output tokens added to every task's max_tokens in thinking mode, for the thought the model
# writes before its answer. A thought cut off by the limit leaves no answer (finish_reason
# "length", an empty text), so the budget errs large; --max_tokens still sets the answer's share.
THINKING_BUDGET = 1024

# Gemma 4's thought-channel markers as they decode (vllm/reasoning/gemma4_utils.py). An answer is split
# at them (transforms/parse.py); with thinking off they have no place in an answer (see engine.py).
THOUGHT_START = "<|channel>"
THOUGHT_END = "<channel|>"

SYSTEM_PROMPT = (
    "You are a meticulous document and image analyst. "
    "Answer only with what the task asks for, without preamble."
)


# Chat-template tokens around a prompt's text: <bos>, the system and user turns' markers, <|image> and <image|>
# around the soft tokens, the model turn's opening, <|think|> (thinking on) or the empty thought channel
# (thinking off, large models), with their newlines: Google's Gemma 4 templates (tests/fixtures/gemma4_templates/).
# Counted generously: an upper bound is what the engine's context length is planned with.
TEMPLATE_TOKENS = 32


def prompt_token_bound(instruction: str, vision_tokens: int) -> int:
    """At most how many tokens `[system][image][instruction]` takes, without the checkpoint's tokenizer.

    Gemma's tokenizer falls back to bytes, so no text token covers less than one UTF-8
    byte: the byte count bounds the text (real text takes about a quarter of it). The
    image takes its soft-token budget. Placeholders are counted as written; the values an
    item fills in are not known before the run (a prompt too long for the engine is that
    item's error row).
    """
    return len(SYSTEM_PROMPT.encode()) + len(instruction.encode()) + vision_tokens + TEMPLATE_TOKENS


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a task's answer is sampled. Greedy (temperature 0) unless a task or a retry rung says otherwise."""

    temperature: float = 0.0
    top_k: Optional[int] = None  # None: the checkpoint's own (generation_config.json) when sampling
    top_p: Optional[float] = None
    # vLLM's repetition_penalty (vllm/sampling_params.py: "values > 1 encourage the model to use new
    # tokens"; it divides the logits of tokens already in the prompt or the output). None: off (1.0).
    # The text kind's retry rungs set it against loops (tasks/kinds/text.py).
    repetition_penalty: Optional[float] = None


def build_messages(instruction: str, image_first: bool = True) -> list[dict[str, Any]]:
    """Chat messages for one task: `[system][image][instruction]`.

    The system content is a plain string: Google's Gemma 4 templates render the
    system turn as `messages[0]['content'] | trim`, so a list of parts would
    reach the model as its Python repr (`[{'type': 'text', ...}]`). The user
    turn is a list of parts, which every Gemma 4 template iterates.

    `image_first=False` puts the instruction before the image; it exists only
    for the benchmark ablation that shows what that costs (no shared prefix
    beyond the system prompt).
    """
    image_part = {"type": "image"}
    text_part = {"type": "text", "text": instruction}
    user_content = [image_part, text_part] if image_first else [text_part, image_part]
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_content},
    ]


class ChatTemplate(Protocol):
    """A tokenizer's (or processor's) `apply_chat_template`, as transformers defines it."""

    def __call__(
        self, conversation: list[dict[str, Any]], *, tokenize: bool, add_generation_prompt: bool, enable_thinking: bool
    ) -> str: ...


def render_prompt(instruction: str, apply_chat_template: ChatTemplate, image_first: bool = True, thinking: bool = False) -> str:
    """The prompt text of one instruction, rendered with the checkpoint's own chat template.

    `enable_thinking` is always passed, never left to the template's default:
    Gemma 4 templates switch both the system turn (`<|think|>`) and, for the
    large models, the generation prompt (an empty thought channel when off)
    on it. The text holds the template's image placeholder; the engine expands
    it to the image's soft tokens. It does not depend on the image.
    """
    return apply_chat_template(
        build_messages(instruction, image_first), tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )


def prompt_version(thinking: bool) -> str:
    """The version written to rows: thinking changes the prompt (and the answers), so it is part of it."""
    return f"{PROMPT_VERSION}+thinking" if thinking else PROMPT_VERSION


def sampling_kwargs(
    sampling: Sampling, max_tokens: int, seed: int = 0, model_defaults: Optional[Mapping[str, Any]] = None
) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` (minus structured output, added by the engine).

    A sampled request (temperature > 0: a task that asks for it, or the
    retry ladder's first rung) draws from the task's `top_k`/`top_p`, else
    the checkpoint's own (`model_defaults`, read from its
    `generation_config.json`; Google ships top_k 64, top_p 0.95): without
    them vLLM samples from the whole 262k-token vocabulary. Greedy requests
    ignore them.
    """
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "temperature": sampling.temperature, "seed": seed}
    if sampling.temperature > 0:
        for key in ("top_k", "top_p"):
            value = getattr(sampling, key)
            if value is None and model_defaults:
                value = model_defaults.get(key)
            if value is not None:
                kwargs[key] = value
    if sampling.repetition_penalty is not None:
        kwargs["repetition_penalty"] = sampling.repetition_penalty
    return kwargs
