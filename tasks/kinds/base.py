"""The output-kind contract: what a task's answer is, and everything that depends on it.

A kind is what `output:` names in a task file (`text`, `boxes`, `json`,
`layout`). It owns, in one place: its task-file defaults (`max_tokens`,
whether a `schema` is required, whether answers are validated and so may be
retried), its default retry ladder, what constrains decoding where the engine
has structured output (`engine.api.Constraint`), its parser (answer ->
`ParsedAnswer`, or an `AnswerError`), its answer for a blank page, the results
column it fills besides `text`, and pure hooks the report and the evaluation call on a results row
(`regions`, `document`, `answer_text`). As small as Beam's `ModelHandler`:
no Beam, no vLLM, no report or evaluation code here; those packages sit above
`tasks` and ask the kind.

Kinds are stateless singletons registered in `tasks.kinds.KINDS`.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping, Optional

from engine.api import Constraint
from schemas.records import ParsedAnswer

# Greedy decoding repeats the same malformed answer; sampling escapes it.
SAMPLED_RETRY_TEMPERATURE = 0.7

Row = Mapping[str, Any]  # a results-table row (schemas.tables.RESULTS_SCHEMA), as Parquet readers return it


@dataclasses.dataclass(frozen=True)
class RetryRung:
    """One step of a task's retry ladder: how the re-asked request differs."""

    temperature: float
    instruction: Optional[str] = None  # a template replacing the task's instruction when set
    repetition_penalty: Optional[float] = None  # a repetition guard (engine.prompts.Sampling); None: the task's
    max_tokens_scale: int = 1  # the task's max_tokens times this, as far as the context leaves room (Task.request)


def escape_braces(text: str) -> str:
    """`text` as an instruction template's literal part (`tasks.task.Template`)."""
    return text.replace("{", "{{").replace("}", "}}")


def restating_ladder(instruction: str, statement: str) -> tuple[RetryRung, ...]:
    """The ladder of a validated kind: sample once, then go back to greedy with the format restated after the instruction."""
    strict = f"{instruction}\n\n{escape_braces(statement)}"
    return (RetryRung(temperature=SAMPLED_RETRY_TEMPERATURE), RetryRung(temperature=0.0, instruction=strict))


class OutputKind(abc.ABC):
    """One output kind (see the module docstring). Subclasses set the class attributes and implement every hook."""

    name: ClassVar[str]  # the task file's `output` value and the registry key
    column: ClassVar[Optional[str]]  # the results column it fills besides `text`; None: text only
    max_tokens: ClassVar[int]  # a task file's default `max_tokens`
    needs_schema: ClassVar[bool] = False  # a task file's `schema` is required (and allowed only then)
    validated: ClassVar[bool]  # answers can fail `parse`, so climb the retry ladder (task files may set `retries`)
    # Answers are free text: a degenerate one (tasks.quality: truncated, looped, empty) climbs the retry
    # ladder as a failed parse does, and its language is identified (the `language` column).
    prose: ClassVar[bool] = False

    @abc.abstractmethod
    def constraint(self, schema: Optional[Mapping[str, Any]]) -> Optional[Constraint]:
        """What constrains decoding where the engine has structured output; None: free text."""

    @abc.abstractmethod
    def retries(self, instruction: str, schema: Optional[Mapping[str, Any]]) -> tuple[RetryRung, ...]:
        """The default retry ladder of a task with this instruction template (and schema)."""

    @abc.abstractmethod
    def parse(
        self, answer: str, schema: Optional[Mapping[str, Any]], width: int, height: int, truncated: bool
    ) -> ParsedAnswer:
        """Typed output columns of an answer (thought already split off), or an AnswerError (`tasks.answers`)."""

    @abc.abstractmethod
    def blank(self) -> ParsedAnswer:
        """The answer of a blank page, given without asking the engine (`transforms.run_tasks`)."""

    @abc.abstractmethod
    def regions(self, row: Row) -> Optional[list[Mapping[str, Any]]]:
        """Report: the row's boxes as detection-shaped mappings (`label`, `box`, `box_px`); None: the kind has none."""

    @abc.abstractmethod
    def document(self, row: Row) -> Any:
        """Report and evaluation: the row's answer as a JSON value to lay out or compare field by field; None: none."""

    @abc.abstractmethod
    def answer_text(self, row: Row) -> str:
        """Evaluation: the row's answer as the text an expected answer is shown and compared with."""

    def __repr__(self) -> str:
        return f"<output kind {self.name}>"
