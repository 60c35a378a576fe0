"""The task contract: what a task asks of an item, how it is sampled, and how its answer becomes columns.

As small as Beam's ModelHandler is for a model (`load_model`,
`run_inference`): a `Task` is a name, an output kind, an instruction
template filled from the item's metadata (`request`), sampling settings,
an image budget, a retry ladder, and `parse`, which turns a completion into
typed output columns or raises a typed `AnswerError`. The built-in tasks
(`tasks.builtin`) and the tasks of a `--task_file`
(`tasks.task_file`) are ordinary definitions against it; nothing else
in the pipeline knows one task from another.

A task's output kind (`tasks.kinds`: `text`, `boxes`, `json`, `layout`)
decides what constrains its decoding, how its answer is parsed and which
column it fills besides `text`. Answers of validated kinds can fail
validation: they climb the task's retry ladder (`retries`) before the last
answer becomes a `parse` error row.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import string
from typing import Any, Mapping, Optional, Sequence

from engine.api import EngineRequest, EngineSettings
from engine.prompts import PROMPT_VERSION, SYSTEM_PROMPT, THINKING_BUDGET, Sampling
from library.metadata import ItemValues
from schemas.records import ParsedAnswer, TaskCompletion
from tasks.answers import AnswerError, CutOffAnswer, cut_off_position, split_answer
from tasks.kinds import TEXT, OutputKind
from tasks.kinds.base import RetryRung
from tasks.quality import RETRIED, degenerate_flags

# Task names end up in columns, metric names (`retries_<task>`) and command lines.
TASK_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# `{key}` or `{a.b.c}`: keys of the item's metadata (library.metadata), dotted to walk into objects.
PLACEHOLDER = re.compile(r"^[\w-]+(\.[\w-]+)*$")


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


@dataclasses.dataclass(frozen=True)
class Task:
    """One thing asked of every item (see the module docstring)."""

    name: str
    instruction: str  # template: {placeholders} are filled from the item's metadata
    output: OutputKind = TEXT
    max_tokens: int = 512  # the answer's output limit (thinking mode adds its own budget)
    sampling: Sampling = Sampling()
    schema: Optional[Mapping[str, Any]] = None  # the answer's JSON Schema, for kinds that need one (json)
    vision_tokens: Optional[int] = None  # the image's soft-token budget; None: the job's
    retries: tuple[RetryRung, ...] = ()  # re-asks when the answer fails validation, in order

    def __post_init__(self) -> None:
        if not TASK_NAME.match(self.name):
            raise ValueError(f"task name {self.name!r}: use lower-case letters, digits and _ (at most 40), starting with a letter")
        if self.output.needs_schema and self.schema is None:
            raise ValueError(f"task {self.name}: a {self.output.name} task needs a schema")
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

    def request(self, values: ItemValues, attempt: int = 0, room: Optional[int] = None) -> EngineRequest:
        """The engine request of `attempt` (0: the first; n: rung n of the ladder) for an item's `values`.

        `room`: the output tokens the context leaves after this item's prompt
        (max_model_len - prompt tokens), when known: a rung's larger budget
        stops there, and never goes below the task's own.
        Raises MissingValue/AmbiguousValue (`library.metadata.PromptError`)
        when the item lacks a value the instruction names.
        """
        instruction, sampling, max_tokens = self.instruction, self.sampling, self.max_tokens
        if attempt:
            rung = self.retries[attempt - 1]
            instruction = rung.instruction or instruction
            sampling = dataclasses.replace(
                sampling, temperature=rung.temperature,
                repetition_penalty=rung.repetition_penalty or sampling.repetition_penalty,
            )
            if rung.max_tokens_scale > 1:
                larger = self.max_tokens * rung.max_tokens_scale
                max_tokens = max(self.max_tokens, larger if room is None else min(larger, room))
        return EngineRequest(
            instruction=Template(instruction).fill(values),
            max_tokens=max_tokens,
            sampling=sampling,
            constraint=self.output.constraint(self.schema),
            vision_tokens=self.vision_tokens,
        )

    def parse(self, answer: str, width: int, height: int, truncated: bool) -> ParsedAnswer:
        """Typed output columns of an answer (thought already split off), or AnswerError."""
        try:
            return self.output.parse(answer, self.schema, width, height, truncated)
        except AnswerError as exc:
            if not truncated:
                raise
            # What the complaint would say about a fragment (e.g. a schema error about a list inside a
            # cut string) misleads: the cause is the limit, and the fix is raising it.
            raise CutOffAnswer(
                f"answer cut off at max_tokens={self.max_tokens} {cut_off_position(answer)}; raise this task's "
                f"max_tokens (--max_tokens {self.name}=N, or max_tokens in the task file)"
            ) from exc

    def read(self, completion: TaskCompletion) -> TaskCompletion:
        """The completion with its thought split off, its answer parsed (`parsed`, or the AnswerError in
        `parse_error`) and its quality flags (`tasks.quality`: degenerate flags, and `retried` past attempt 1)."""
        answer = split_answer(completion.text)
        info = completion.info
        flags = degenerate_flags(answer.text, completion.finish_reason, self.output.prose)
        flags += (RETRIED,) if completion.attempts > 1 else ()
        read = dataclasses.replace(completion, thought=answer.thought, quality_flags=flags)
        try:
            parsed = self.parse(answer.text, info.width, info.height, completion.finish_reason == "length")
        except AnswerError as exc:
            return dataclasses.replace(read, parse_error=exc)
        return dataclasses.replace(read, parsed=parsed)


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
                "task": self._definition(task),
                "vision_tokens": task.vision_tokens or settings.vision_tokens,
                "system_prompt": SYSTEM_PROMPT,
                "prompt_version": PROMPT_VERSION,
                "thinking": settings.thinking,
                "constrained": settings.structured_output and task.output.constraint(task.schema) is not None,
                "image_first": settings.image_first,
            })
            for task in tasks
        }

    @staticmethod
    def _definition(task: Task) -> dict[str, Any]:
        """The task's fields, its kind and schema spelled as when kinds were enum members and a boxes task
        carried its decoding schema: the tasks of earlier runs keep their fingerprints."""
        constraint = task.output.constraint(task.schema)
        fields = dataclasses.asdict(task)
        # Fields added later, at their defaults, are left out: a task that does not use them keeps its fingerprint.
        for later, default in (("repetition_penalty", None), ("max_tokens_scale", 1)):
            for part in (fields["sampling"], *fields["retries"]):
                if part.get(later, default) == default:
                    part.pop(later, None)
        return {
            **fields,
            "output": f"OutputKind.{task.output.name.upper()}",
            "schema": None if constraint is None else constraint.json_schema,
        }

    def of(self, task: str, values: ItemValues) -> str:
        filled = {name: values.get_or_none(name) for name in self._tasks[task].placeholders}
        return _digest([self._definitions[task], filled]) if filled else self._definitions[task]
