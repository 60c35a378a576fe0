"""Parse stage: engine completions -> result rows, or error rows when validation fails.

The parsing itself is pure and lives with the tasks (`tasks.answers`); this stage only
applies each completion's task to its answer and routes the outcome.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import apache_beam as beam

from library import metrics
from library.errors import task_failure
from schemas.records import RunInfo, Stage, TaskCompletion
from schemas.tables import result_row
from tasks.answers import AnswerError, split_answer
from tasks.task import Task


class ParseCompletions(beam.DoFn):
    """TaskCompletion -> results row; completions that fail their task's validation -> ErrorRecord (tag `errors`)."""

    def __init__(self, tasks: Sequence[Task], run: RunInfo):
        self._tasks = {task.name: task for task in tasks}
        self._run = run

    def process(self, completion: TaskCompletion) -> Iterator[Any]:
        task = self._tasks[completion.task]
        truncated = completion.finish_reason == "length"
        if truncated:
            metrics.count("truncated_outputs")
        answer = split_answer(completion.text)
        info = completion.info
        try:
            parsed = task.parse(answer.text, info.width, info.height, truncated)
        except AnswerError as exc:
            if completion.attempts > 1:
                exc = type(exc)(f"{exc} (after {completion.attempts} attempts)")
            yield task_failure(
                info, completion.task, Stage.PARSE, exc, raw_output=completion.text, attempts=completion.attempts,
                instruction=completion.instruction, task_fingerprint=completion.task_fingerprint,
            )
            return
        if parsed.detections is not None:
            metrics.count("detections", len(parsed.detections))
        yield result_row(dataclasses.replace(completion, thought=answer.thought), self._run, parsed)
