"""The built-in tasks: ordinary definitions against the task contract (`tasks.task`).

Changing an instruction here changes the prompt: bump PROMPT_VERSION
(`engine.prompts`) with it.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from tasks.kinds import BOXES, LAYOUT, TEXT
from tasks.kinds.layout import CATEGORIES
from tasks.task import Task

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

# The markdown task's reading (reading order, tables, equations) as blocks with boxes: Gemma's
# box convention as `detect` states it, the categories named so the model picks among them.
_LAYOUT = (
    "Split this page into its layout blocks, in natural reading order. Return a JSON list of objects, each "
    '{{"box_2d": [ymin, xmin, ymax, xmax], "category": "<category>", "text": "<the block\'s text>"}}, with '
    f"coordinates normalised to 0-1000 and category one of {', '.join(CATEGORIES)}. Write each block's text "
    "exactly as on the page; tables as Markdown tables, or as HTML <table> when a cell spans several rows or "
    "columns; formulas in LaTeX. Return [] if the page is empty."
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
            text_layer="answer",  # --text_layer auto/anchor: a trusted PDF page's own text is its transcription
            # Greedy (the default): transcription has one right answer and must be reproducible.
            retries=TEXT.retries("", None),  # for degenerate answers (tasks/quality.py)
        ),
        Task(
            name="caption",
            instruction="Describe the image in one or two sentences.",
            max_tokens=128,
            # Greedy: reproducible nightly reruns; diversity has no value in a batch caption.
            retries=TEXT.retries("", None),
        ),
        Task(
            name="detect",
            instruction=_DETECT,
            output=BOXES,
            max_tokens=BOXES.max_tokens,  # room for 64 boxes, measured (tasks/kinds/boxes.py)
            retries=BOXES.retries(_DETECT, None),
        ),
        Task(
            name="markdown",
            instruction=_MARKDOWN,
            # The page's text (ocr: ~1,000-1,500 tokens for a dense page) plus its markup (table
            # pipes, HTML cells, LaTeX): twice ocr's budget, as a truncated page loses its end.
            max_tokens=4096,
            text_layer="anchor",  # --text_layer anchor: the layer's text in the prompt (the markup is the model's)
            retries=TEXT.retries(_MARKDOWN, None),
        ),
        Task(
            name="layout",
            instruction=_LAYOUT,
            output=LAYOUT,
            max_tokens=LAYOUT.max_tokens,  # markdown's budget plus a box per block (tasks/kinds/layout.py)
            retries=LAYOUT.retries(_LAYOUT, None),
        ),
    )
}

DEFAULT_TASKS: tuple[str, ...] = ("ocr", "caption", "detect")
# The tasks that read a whole page's text: an engine profile may give them a larger image budget
# (engine/profiles.py, EngineProfile.page_vision_tokens).
PAGE_TASKS: tuple[str, ...] = ("ocr", "markdown", "layout")


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
