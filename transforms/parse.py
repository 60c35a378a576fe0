"""Parse stage: engine completions -> result rows, or error rows when validation fails.

The parsing itself is pure and lives with the tasks (`tasks.kinds`, `tasks.answers`). The
engine stage reads each answer once (`Task.read`, to decide on retries) and the completion
carries the outcome here; this stage routes it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import apache_beam as beam

from library import metrics
from library.errors import task_failure
from schemas.records import RunInfo, Stage, TaskCompletion
from schemas.tables import result_row
from tasks.language import language
from tasks.task import Task


class ParseCompletions(beam.DoFn):
    """TaskCompletion -> results row; completions that fail their task's validation -> ErrorRecord (tag `errors`)."""

    def __init__(self, tasks: Sequence[Task], run: RunInfo):
        self._tasks = {task.name: task for task in tasks}
        self._run = run

    def process(self, completion: TaskCompletion) -> Iterator[Any]:
        if completion.parsed is None and completion.parse_error is None:
            # Not read by RunTasks (benchmarks/variants.py's RunInference variant): read it here, once.
            completion = self._tasks[completion.task].read(completion)
        if completion.finish_reason == "length":
            metrics.count("truncated_outputs")
        if completion.parse_error is not None:
            exc = completion.parse_error
            if completion.attempts > 1:
                exc = type(exc)(f"{exc} (after {completion.attempts} attempts)")
            yield task_failure(
                completion.info, completion.task, Stage.PARSE, exc, raw_output=completion.text,
                attempts=completion.attempts, instruction=completion.instruction,
                task_fingerprint=completion.task_fingerprint,
            )
            return
        parsed = completion.parsed
        assert parsed is not None
        if self._tasks[completion.task].output.prose:
            completion = dataclasses.replace(completion, language=language(parsed.text))
        for flag in completion.quality_flags:
            metrics.count(f"quality_flag_{flag}")
        if parsed.detections is not None:
            metrics.count("detections", len(parsed.detections))
        yield result_row(completion, self._run, parsed)
