"""The task contract: what a task asks of an item, how it is sampled, and how its answer becomes columns.

As small as Beam's ModelHandler is for a model (`load_model`,
`run_inference`): a `Task` is a name, an output kind, an instruction
template filled from the item's metadata (`request`), sampling settings,
an image budget, a retry ladder, and `parse`, which turns a completion into
typed output columns or raises a typed `AnswerError`. The built-in tasks
(`tasks.builtin`) and the tasks of a `--task_file`
(`tasks.task_file`) are ordinary definitions against it; nothing else
in the pipeline knows one task from another.

Output kinds, and what `parse` fills in besides `text`:

- `text`: nothing; the answer is the text.
- `boxes`: `detections`, from a Gemma-style box list.
- `json`: `data`, a JSON document valid against the task's JSON Schema.

`boxes` and `json` answers can fail validation: they climb the task's retry
ladder (`retries`) before the last answer becomes a `parse` error row.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import string
from typing import Any, Mapping, Optional, Sequence

from engine.api import Constraint, EngineRequest, EngineSettings
from engine.prompts import PROMPT_VERSION, SYSTEM_PROMPT, THINKING_BUDGET, Sampling
from library.metadata import ItemValues
from schemas.records import ParsedAnswer
from tasks.answers import AnswerError, CutOffAnswer, cut_off_position, parse_detections, parse_json_document, strip_code_fence

# Task names end up in columns, metric names (`retries_<task>`) and command lines.
TASK_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# `{key}` or `{a.b.c}`: keys of the item's metadata (library.metadata), dotted to walk into objects.
PLACEHOLDER = re.compile(r"^[\w-]+(\.[\w-]+)*$")

BOX_FORMAT = (
    'Reply with ONLY a JSON array and nothing else: [{"box_2d": [ymin, xmin, ymax, xmax], "label": "name"}], '
    "integers 0-1000, ymin < ymax, xmin < xmax. Reply [] if there is nothing."
)
JSON_FORMAT = "Reply with ONLY a JSON document that matches this JSON Schema, and nothing else:"
# Greedy decoding repeats the same malformed answer; sampling escapes it.
SAMPLED_RETRY_TEMPERATURE = 0.7


class OutputKind(enum.Enum):
    TEXT = "text"
    BOXES = "boxes"
    JSON = "json"


class Template:
    """An instruction with `{placeholders}` (`{{` and `}}` are literal braces)."""

    def __init__(self, text: str):
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
        self._parts: list[tuple[str, Optional[str]]] = []
        for literal, name, spec, conversion in parts:
            if name is not None and (spec or conversion or not PLACEHOLDER.match(name)):
                raise ValueError(
                    f"placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} is not "
                    "a metadata key: write {key} or {a.b} (no formats, conversions or indexes)"
                )
            self._parts.append((literal, name))

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for _, name in self._parts if name is not None))

    def fill(self, values: ItemValues) -> str:
        """The text with every placeholder replaced (MissingValue/AmbiguousValue when the item lacks one)."""
        return "".join(literal + (values.get(name) if name is not None else "") for literal, name in self._parts)


def escape_braces(text: str) -> str:
    """`text` as a template's literal part."""
    return text.replace("{", "{{").replace("}", "}}")


@dataclasses.dataclass(frozen=True)
class RetryRung:
    """One step of a task's retry ladder: how the re-asked request differs."""

    temperature: float
    instruction: Optional[str] = None  # a template replacing the task's instruction when set


@dataclasses.dataclass(frozen=True)
class Task:
    """One thing asked of every item (see the module docstring)."""

    name: str
    instruction: str  # template: {placeholders} are filled from the item's metadata
    output: OutputKind = OutputKind.TEXT
    max_tokens: int = 512  # the answer's output limit (thinking mode adds its own budget)
    sampling: Sampling = Sampling()
    schema: Optional[Mapping[str, Any]] = None  # json: the answer's JSON Schema; boxes: the box list's (decoding only)
    vision_tokens: Optional[int] = None  # the image's soft-token budget; None: the job's
    retries: tuple[RetryRung, ...] = ()  # re-asks when the answer fails validation, in order

    def __post_init__(self) -> None:
        if not TASK_NAME.match(self.name):
            raise ValueError(f"task name {self.name!r}: use lower-case letters, digits and _ (at most 40), starting with a letter")
        if self.output is OutputKind.JSON and self.schema is None:
            raise ValueError(f"task {self.name}: a json task needs a schema")
        first = set(Template(self.instruction).placeholders)
        for rung in self.retries:
            later = set(Template(rung.instruction).placeholders) if rung.instruction else set()
            if later - first:
                raise ValueError(
                    f"task {self.name}: a retry instruction names {', '.join(sorted(later - first))}, which the "
                    "task's instruction does not: a retry asks again for the same item values"
                )

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The metadata keys the task's instruction names (its retry rungs name no others)."""
        return Template(self.instruction).placeholders

    @property
    def validated(self) -> bool:
        """Answers can fail `parse` (and so climb the retry ladder)."""
        return self.output is not OutputKind.TEXT

    def request(self, values: ItemValues, attempt: int = 0) -> EngineRequest:
        """The engine request of `attempt` (0: the first; n: rung n of the ladder) for an item's `values`.

        Raises MissingValue/AmbiguousValue (`library.metadata.PromptError`)
        when the item lacks a value the instruction names.
        """
        instruction, sampling = self.instruction, self.sampling
        if attempt:
            rung = self.retries[attempt - 1]
            instruction = rung.instruction or instruction
            sampling = dataclasses.replace(sampling, temperature=rung.temperature)
        return EngineRequest(
            instruction=Template(instruction).fill(values),
            max_tokens=self.max_tokens,
            sampling=sampling,
            constraint=None if self.schema is None else Constraint(json_schema=self.schema),
            vision_tokens=self.vision_tokens,
        )

    def parse(self, answer: str, width: int, height: int, truncated: bool) -> ParsedAnswer:
        """Typed output columns of an answer (thought already split off), or AnswerError."""
        text = strip_code_fence(answer)
        try:
            if self.output is OutputKind.BOXES:
                return ParsedAnswer(text=text, detections=tuple(parse_detections(answer, width, height, truncated)))
            if self.output is OutputKind.JSON:
                assert self.schema is not None
                return ParsedAnswer(text=text, data=parse_json_document(answer, self.schema, truncated))
        except AnswerError as exc:
            if not truncated:
                raise
            # What the complaint would say about a fragment (e.g. a schema error about a list inside a
            # cut string) misleads: the cause is the limit, and the fix is raising it.
            raise CutOffAnswer(
                f"answer cut off at max_tokens={self.max_tokens} {cut_off_position(answer)}; raise this task's "
                f"max_tokens (--max_tokens {self.name}=N, or max_tokens in the task file)"
            ) from exc
        return ParsedAnswer(text=text)


def default_retries(output: OutputKind, instruction: str, schema: Optional[Mapping[str, Any]]) -> tuple[RetryRung, ...]:
    """The ladder of a validated output kind: sample once, then restate the format and go back to greedy."""
    if output is OutputKind.BOXES:
        strict = f"{instruction}\n\n{escape_braces(BOX_FORMAT)}"
    elif output is OutputKind.JSON:
        strict = f"{instruction}\n\n{escape_braces(JSON_FORMAT)}\n{escape_braces(json.dumps(schema, ensure_ascii=False))}"
    else:
        return ()
    return (RetryRung(temperature=SAMPLED_RETRY_TEMPERATURE), RetryRung(temperature=0.0, instruction=strict))


def with_overrides(
    task: Task, max_tokens: Optional[int] = None, vision_tokens: Optional[int] = None, thinking: bool = False
) -> Task:
    """The task as a job runs it: `--max_tokens`/`--task_vision_tokens` overrides, and room for the thought."""
    return dataclasses.replace(
        task,
        max_tokens=(max_tokens or task.max_tokens) + (THINKING_BUDGET if thinking else 0),
        vision_tokens=vision_tokens or task.vision_tokens,
    )


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


class TaskFingerprints:
    """The fingerprint of (task definition, item values): equal fingerprints mean the same request.

    It covers everything that changes an answer besides the image and the
    model: the task's instruction templates, output kind, schema, sampling,
    `max_tokens`, image budget and retry ladder; the system prompt,
    PROMPT_VERSION, thinking, whether decoding is constrained to the schema,
    the message layout; and the values the item fills into the templates.
    Written to every row (`task_fingerprint`) and part of the incremental-run
    key, so changing any of them re-runs exactly the (item, task) pairs it
    changes. The definition part is digested once per task.
    """

    def __init__(self, tasks: Sequence[Task], settings: EngineSettings):
        self._tasks = {task.name: task for task in tasks}
        self._definitions = {
            task.name: _digest({
                "task": dataclasses.asdict(task),
                "vision_tokens": task.vision_tokens or settings.vision_tokens,
                "system_prompt": SYSTEM_PROMPT,
                "prompt_version": PROMPT_VERSION,
                "thinking": settings.thinking,
                "constrained": settings.structured_output and task.schema is not None,
                "image_first": settings.image_first,
            })
            for task in tasks
        }

    def of(self, task: str, values: ItemValues) -> str:
        filled = {name: values.get_or_none(name) for name in self._tasks[task].placeholders}
        return _digest([self._definitions[task], filled]) if filled else self._definitions[task]
