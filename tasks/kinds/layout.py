"""`layout`: the page as blocks in reading order, each with a category, a box and its text; `text` is their Markdown.

The model answers a JSON list in reading order,
`[{"box_2d": [ymin, xmin, ymax, xmax], "category": "title", "text": "..."}]`,
with Gemma's 0-1000 box convention (as `boxes`), constrained by
`LAYOUT_JSON_SCHEMA` where the engine has structured output and parsed as
defensively as a box list where it has not (prose and fences around the
list, corners reordered, values clipped, a truncated list cut back to its
complete blocks). Each block becomes a `Block` (its position in the list is
its reading-order index) in the `blocks` column, and `markdown(blocks)`
fills `text`, so a layout answer reads like the `markdown` task's.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from engine.api import Constraint
from schemas.records import Block, ParsedAnswer
from tasks.answers import AnswerError, box_coordinates, listed_entries, listed_payload, to_detection
from tasks.kinds.base import OutputKind, RetryRung, Row, restating_ladder
from tasks.kinds.boxes import BOX_2D_SCHEMA, DETECTION_MAX_BOXES, DETECTION_TOKENS_PER_BOX

# DocLayNet's classes (Caption, Footnote, Formula, List-item, Page-footer, Page-header, Picture,
# Section-header, Table, Text, Title; DS4SD/DocLayNet), with section headers folded into title,
# pictures called figure and page headers and footers header and footer.
CATEGORIES: tuple[str, ...] = (
    "text", "title", "list", "table", "figure", "formula", "caption", "header", "footer", "footnote",
)
LAYOUT_MAX_BLOCKS = DETECTION_MAX_BOXES  # a dense page (a form, a two-column article) has dozens of blocks
# The page's text as the markdown task writes it (its 4,096 tokens in tasks/builtin.py: the text
# plus table and LaTeX markup), plus one box and category per block, which cost what a detection
# does (DETECTION_TOKENS_PER_BOX, measured; a one-token category in place of a short label, a
# "text" key in place of "label"): 4,096 + 64 * 33 = 6,208. Like markdown's, above the 4,096-token
# context of cpu-tiny and TPU (engine/profiles.py): there a dense page stops at the context and
# keeps its complete blocks.
LAYOUT_MAX_TOKENS = 4096 + LAYOUT_MAX_BLOCKS * DETECTION_TOKENS_PER_BOX

LAYOUT_JSON_SCHEMA: Mapping[str, Any] = {
    "type": "array",
    "maxItems": LAYOUT_MAX_BLOCKS,
    "items": {
        "type": "object",
        "properties": {"box_2d": BOX_2D_SCHEMA, "category": {"enum": list(CATEGORIES)}, "text": {"type": "string"}},
        "required": ["box_2d", "category", "text"],
        "additionalProperties": False,
    },
}

LAYOUT_FORMAT = (
    'Reply with ONLY a JSON array in reading order and nothing else: [{"box_2d": [ymin, xmin, ymax, xmax], '
    f'"category": "text", "text": "..."}}], integers 0-1000, category one of {", ".join(CATEGORIES)}. '
    "Reply [] if the page is empty."
)


class LayoutParseError(AnswerError):
    """Model output that is not a usable list of layout blocks."""


def parse_blocks(answer: str, width: int, height: int, truncated: bool = False) -> list[Block]:
    """The answer's blocks in reading order, boxes in the three frames detections use; or LayoutParseError.

    A block whose box has no area keeps its text (the box is None): its text
    belongs to the page whatever its box.
    """
    blocks = []
    payload = listed_payload(answer, truncated, LayoutParseError, "blocks")
    for index, entry in enumerate(listed_entries(payload, LayoutParseError, "blocks")):
        box = box_coordinates(entry, index, LayoutParseError)
        category, text = entry.get("category"), entry.get("text", "")
        if not isinstance(category, str) or category.strip().lower() not in CATEGORIES:
            raise LayoutParseError(f"entry {index}: category {category!r} is not one of {', '.join(CATEGORIES)}")
        if not isinstance(text, str):
            raise LayoutParseError(f"entry {index}: text must be a string, got {text!r}")
        category = category.strip().lower()
        region = to_detection(category, box, width, height)
        frames = (region.box_1000, region.box_norm, region.box_px) if region else (None, None, None)
        blocks.append(Block(len(blocks), category, text.strip(), *frames))
    return blocks


def _markdown_of(block: Block) -> str:
    if block.category == "title":
        return f"# {block.text}"
    if block.category == "formula" and not block.text.startswith("$"):
        return f"$$\n{block.text}\n$$"
    return block.text


# Running headers and footers are left out, as the markdown task leaves them out (tasks/builtin.py).
_NOT_IN_MARKDOWN = frozenset({"header", "footer"})


def markdown(blocks: Sequence[Block]) -> str:
    """The blocks as one Markdown page in reading order: titles as headings, formulas as $$ blocks, tables as written."""
    ordered = sorted(blocks, key=lambda block: block.index)
    return "\n\n".join(
        _markdown_of(block) for block in ordered if block.category not in _NOT_IN_MARKDOWN and block.text
    )


class LayoutKind(OutputKind):
    name = "layout"
    column = "blocks"
    max_tokens = LAYOUT_MAX_TOKENS
    validated = True

    def constraint(self, schema: Optional[Mapping[str, Any]]) -> Optional[Constraint]:
        return Constraint(json_schema=LAYOUT_JSON_SCHEMA)

    def retries(self, instruction: str, schema: Optional[Mapping[str, Any]]) -> tuple[RetryRung, ...]:
        return restating_ladder(instruction, LAYOUT_FORMAT)

    def parse(
        self, answer: str, schema: Optional[Mapping[str, Any]], width: int, height: int, truncated: bool
    ) -> ParsedAnswer:
        blocks = tuple(parse_blocks(answer, width, height, truncated))
        return ParsedAnswer(text=markdown(blocks), blocks=blocks)

    def blank(self) -> ParsedAnswer:
        return ParsedAnswer(text="", blocks=())  # a page without blocks

    def regions(self, row: Row) -> Optional[list[Mapping[str, Any]]]:
        return [
            {"label": block["category"], "box": block["box"], "box_px": block["box_px"]}
            for block in row.get("blocks") or () if block.get("box") is not None
        ]

    def document(self, row: Row) -> Any:
        return None

    def answer_text(self, row: Row) -> str:
        return row.get("text") or ""


LAYOUT = LayoutKind()
