"""`text`: the answer is the text (ocr, caption, markdown, free questions)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from engine.api import Constraint
from schemas.records import ParsedAnswer
from tasks.answers import strip_code_fence
from tasks.kinds.base import OutputKind, RetryRung, Row


class TextKind(OutputKind):
    name = "text"
    column = None
    max_tokens = 512  # a short answer; task files raise it per task
    validated = False  # any text is an answer: nothing to retry

    def constraint(self, schema: Optional[Mapping[str, Any]]) -> Optional[Constraint]:
        return None

    def retries(self, instruction: str, schema: Optional[Mapping[str, Any]]) -> tuple[RetryRung, ...]:
        return ()

    def parse(
        self, answer: str, schema: Optional[Mapping[str, Any]], width: int, height: int, truncated: bool
    ) -> ParsedAnswer:
        return ParsedAnswer(text=strip_code_fence(answer))

    def blank(self) -> ParsedAnswer:
        return ParsedAnswer(text="")  # nothing to read, describe or convert

    def regions(self, row: Row) -> Optional[list[Mapping[str, Any]]]:
        return None

    def document(self, row: Row) -> Any:
        return None

    def answer_text(self, row: Row) -> str:
        return row.get("text") or ""


TEXT = TextKind()
