"""Incremental runs: skip (item, task) pairs that earlier runs already answered.

A task result is reusable when the item's content, the task, the model, the
prompt version and the task's fingerprint (its definition and the item's
values: `transforms.tasks.TaskFingerprints`) are all the same, whatever the
file is called now or which run produced it: raising `--max_tokens ocr=...`
re-runs OCR, and nothing else. Keys of earlier results are read from their
Parquet (five columns only) and handed to every worker as a side input.
Results written before fingerprints existed have none and are never reused.

Memory: each reusable result costs a 16-byte digest plus set overhead
(~90 bytes) on every worker: ~1 GB for 10 M earlier results. Beyond that,
point --incremental_from at fewer (compacted) locations.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam

from schemas.records import ImageItem, RunInfo
from transforms import metrics
from transforms.engine import EngineSettings
from transforms.metadata import ItemValues
from transforms.tasks import Task, TaskFingerprints

KEY_COLUMNS = ["content_hash", "task", "model_id", "prompt_version", "task_fingerprint"]


def done_key(content_hash: str, task: str, model_id: str, prompt_version: str, task_fingerprint: Optional[str]) -> bytes:
    """The identity of one answer: the one place it is built, for earlier results and current items alike."""
    key = "\x1f".join((content_hash, task, model_id, prompt_version, task_fingerprint or ""))
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def results_pattern(location: str) -> str:
    return f"{location.rstrip('/')}/results/*.parquet"


class ReadDoneKeys(beam.PTransform):
    """Earlier output locations -> digests of their results for this run's model and prompt version.

    A location without results (e.g. yesterday's run failed) contributes nothing.
    """

    def __init__(self, locations: Sequence[str], run: RunInfo):
        super().__init__()
        self._patterns = [results_pattern(location) for location in locations]
        self._run = run

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        run = self._run
        return (
            pbegin
            | "EarlierResults" >> beam.Create(self._patterns)
            | "ReadKeys" >> beam.io.ReadAllFromParquet(columns=KEY_COLUMNS)
            | "SameModelAndPrompts" >> beam.Filter(
                lambda row: row["model_id"] == run.model_id and row["prompt_version"] == run.prompt_version
            )
            | "Digest" >> beam.Map(lambda row: done_key(*(row.get(column) for column in KEY_COLUMNS)))
        )


class SelectTasks(beam.DoFn):
    """ImageItem -> the same item with the tasks still to run; fully answered items are dropped (counted)."""

    def __init__(self, tasks: Sequence[Task], settings: EngineSettings, run: RunInfo):
        self._tasks = tuple(task.name for task in tasks)
        self._fingerprints = TaskFingerprints(tasks, settings)
        self._run = run
        self._done: Optional[frozenset[bytes]] = None

    def process(self, item: ImageItem, done: Iterable[bytes] = ()) -> Iterator[Any]:
        if self._done is None:
            # Built once per DoFn instance, not per bundle: in a batch job the
            # (global-window) side input is the same for every bundle.
            self._done = frozenset(done)
        run, values = self._run, ItemValues(item.info.metadata)
        remaining = tuple(
            task
            for task in self._tasks
            if done_key(item.info.content_hash, task, run.model_id, run.prompt_version, self._fingerprints.of(task, values))
            not in self._done
        )
        skipped = len(self._tasks) - len(remaining)
        if skipped:
            metrics.count("skipped_tasks", skipped)
        if not remaining:
            metrics.count("skipped_items")
            return
        yield dataclasses.replace(item, tasks=remaining)
