"""`json`: a JSON document valid against the task's own JSON Schema, in `data` as compact JSON text."""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from engine.api import Constraint
from schemas.records import ParsedAnswer
from tasks.answers import parse_json_document, strip_code_fence
from tasks.kinds.base import OutputKind, RetryRung, Row, restating_ladder

JSON_FORMAT = "Reply with ONLY a JSON document that matches this JSON Schema, and nothing else:"


class JsonKind(OutputKind):
    name = "json"
    column = "data"
    max_tokens = 512  # bound the schema's strings and numbers instead (README, "Examples")
    needs_schema = True
    validated = True

    def constraint(self, schema: Optional[Mapping[str, Any]]) -> Optional[Constraint]:
        assert schema is not None  # Task checks: a json task has a schema
        return Constraint(json_schema=schema)

    def retries(self, instruction: str, schema: Optional[Mapping[str, Any]]) -> tuple[RetryRung, ...]:
        return restating_ladder(instruction, f"{JSON_FORMAT}\n{json.dumps(schema, ensure_ascii=False)}")

    def parse(
        self, answer: str, schema: Optional[Mapping[str, Any]], width: int, height: int, truncated: bool
    ) -> ParsedAnswer:
        assert schema is not None
        return ParsedAnswer(text=strip_code_fence(answer), data=parse_json_document(answer, schema, truncated))

    def blank(self) -> ParsedAnswer:
        # No document: none can be made valid against an arbitrary schema without the model, and asking
        # it about an empty page invites an invented one (allenai/olmocr#292). `data` is null, the row flagged.
        return ParsedAnswer(text="", data=None)

    def regions(self, row: Row) -> Optional[list[Mapping[str, Any]]]:
        return None

    def document(self, row: Row) -> Any:
        return json.loads(row["data"]) if row.get("data") else None

    def answer_text(self, row: Row) -> str:
        return row.get("data") or row.get("text") or ""


JSON = JsonKind()
