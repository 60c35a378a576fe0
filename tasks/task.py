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
from engine.prompts import PROMPT_VERSION, SYSTEM_PROMPT, THINKING_BUDGET, THOUGHT_START, Sampling
from library.text_layer import READER_VERSION as LAYER_READER_VERSION
from tasks.text_layer import ANCHOR_PROMPT_VERSION, LAYER_USES
from library.metadata import ItemValues
from schemas.records import ItemInfo, ParsedAnswer, TaskCompletion
from tasks.answers import AnswerError, CutOffAnswer, ThoughtUsedAllTokens, boxes_on_source, cut_off_position, split_answer
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
    # What a PDF page's text layer does for this task under --text_layer auto/anchor (tasks.text_layer.LAYER_USES):
    # "none", "answer" (trusted pages are answered by the layer; text tasks only) or "anchor" (the layer goes in the prompt).
    text_layer: str = "none"

    def __post_init__(self) -> None:
        if not TASK_NAME.match(self.name):
            raise ValueError(f"task name {self.name!r}: use lower-case letters, digits and _ (at most 40), starting with a letter")
        if self.text_layer not in LAYER_USES:
            raise ValueError(f"task {self.name}: text_layer {self.text_layer!r}: choose {', '.join(LAYER_USES)}")
        if self.text_layer == "answer" and self.output.column is not None:  # a layer's text fills `text` alone
            raise ValueError(f"task {self.name}: only a text task can be answered by the text layer (text_layer: answer); "
                             "use text_layer: anchor to give the model the layer's text")
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
        `parse_error`) and its quality flags (`tasks.quality`: degenerate flags, and `retried` past attempt 1).

        The model saw the page turned `info.rotation` degrees (upright): its boxes are read in that
        page's frame and moved back to the source's (`boxes_on_source`).
        """
        answer = split_answer(completion.text)
        info = completion.info
        width, height = (info.height, info.width) if info.rotation in (90, 270) else (info.width, info.height)
        truncated = completion.finish_reason == "length"
        flags = degenerate_flags(answer.text, completion.finish_reason, self.output.prose)
        flags += (RETRIED,) if completion.attempts > 1 else ()
        read = dataclasses.replace(completion, thought=answer.thought, quality_flags=flags)
        try:
            if truncated and not answer.text and THOUGHT_START in completion.text:
                # Any kind, text too: an empty answer here is no answer, not an empty page.
                raise ThoughtUsedAllTokens(
                    f"the thought used all max_tokens={self.max_tokens} output tokens before any answer; raise this "
                    f"task's max_tokens (--max_tokens {self.name}=N, or max_tokens in the task file)"
                )
            parsed = self.parse(answer.text, width, height, truncated)
        except AnswerError as exc:
            return dataclasses.replace(read, parse_error=exc)
        parsed = boxes_on_source(parsed, info.rotation, info.width, info.height)
        return dataclasses.replace(read, parsed=parsed)

    def blank(self, info: ItemInfo, instruction: str, fingerprint: str) -> TaskCompletion:
        """The answer for a blank page (`info.blank`), made without the engine: its kind's empty answer, no attempt."""
        return TaskCompletion(
            info=info, task=self.name, text="", finish_reason=None, prompt_tokens=0, generated_tokens=0,
            cached_tokens=0, latency_s=0.0, attempts=0, instruction=instruction, task_fingerprint=fingerprint,
            parsed=self.output.blank(),
        )


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


def layer_fingerprint() -> str:
    """The fingerprint of every answer a PDF page's text layer gives (`TaskFingerprints.of`, route "text_layer")."""
    return _digest({"text_layer": LAYER_READER_VERSION})


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
        # text_layer is left out: it changes no model request (its routes have fingerprints of their own, `of`).
        fields = {key: value for key, value in dataclasses.asdict(task).items() if key != "text_layer"}
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

    def of(self, task: str, values: ItemValues, route: str = "model") -> str:
        """The fingerprint of `task` for an item's `values`, answered by `route` (`tasks.text_layer.Route`).

        "model" (a plain request) keeps the fingerprint runs had before text
        layers were read; an anchored request adds the anchor prompt's version;
        a text-layer answer depends on neither the task's request nor the item's
        values, only on the layer reader's version.
        """
        if route == "text_layer":
            return layer_fingerprint()
        filled = {name: values.get_or_none(name) for name in self._tasks[task].placeholders}
        fingerprint = _digest([self._definitions[task], filled]) if filled else self._definitions[task]
        return _digest([fingerprint, {"anchor": ANCHOR_PROMPT_VERSION}]) if route == "anchor" else fingerprint
