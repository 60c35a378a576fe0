"""`text`: the answer is the text (ocr, caption, markdown, free questions)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from engine.api import Constraint
from schemas.records import ParsedAnswer
from tasks.answers import strip_code_fence
from tasks.kinds.base import SAMPLED_RETRY_TEMPERATURE, OutputKind, RetryRung, Row

# The guard of the retry rungs: vLLM's repetition_penalty (engine.prompts.Sampling). Mild, because
# it divides the logits of every token already in the prompt or the answer, and a real page repeats
# its words ("the", digits, table pipes): 1.05 leaves a real repeat likely while tipping a greedy
# loop, whose every next token is already in the answer, off its track. (HF's and vLLM's
# default is 1.0, off; the CTRL paper that introduced it used 1.2 for free generation.)
REPETITION_PENALTY = 1.05
# The second rung's output budget: twice the task's, as far as the context leaves room.
LONGER_ANSWER_SCALE = 2


class TextKind(OutputKind):
    name = "text"
    column = None
    max_tokens = 512  # a short answer; task files raise it per task
    validated = False  # any text parses; a degenerate one (prose) is what climbs the ladder
    prose = True

    def constraint(self, schema: Optional[Mapping[str, Any]]) -> Optional[Constraint]:
        return None

    def retries(self, instruction: str, schema: Optional[Mapping[str, Any]]) -> tuple[RetryRung, ...]:
        """For degenerate answers (tasks.quality): sample once with the guard (a greedy loop repeats on a
        greedy re-ask), then greedy again (transcription has one right answer) with the guard and a larger
        budget (a dense page cut by max_tokens needs room, not chance)."""
        return (
            RetryRung(temperature=SAMPLED_RETRY_TEMPERATURE, repetition_penalty=REPETITION_PENALTY),
            RetryRung(temperature=0.0, repetition_penalty=REPETITION_PENALTY, max_tokens_scale=LONGER_ANSWER_SCALE),
        )

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
