"""Incremental runs: skip (item, task) pairs that earlier runs already answered.

A task result is reusable when the item's content, the task, the model and
the prompt version are all the same, whatever the file is called now or
which run produced it. Keys of earlier results are read from their Parquet
(four columns only) and handed to every worker as a side input.

Memory: each reusable result costs a 16-byte digest plus set overhead
(~90 bytes) on every worker: ~1 GB for 10 M earlier results. Beyond that,
point --incremental_from at fewer (compacted) locations.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from schemas.records import ImageItem, RunInfo
from transforms import metrics
from transforms.sinks import SUMMARY_FILE

KEY_COLUMNS = ["content_hash", "task", "model_id", "prompt_version"]


def done_key(content_hash: str, task: str, model_id: str, prompt_version: str) -> bytes:
    return hashlib.blake2b(f"{content_hash}\x1f{task}\x1f{model_id}\x1f{prompt_version}".encode(), digest_size=16).digest()


def results_pattern(location: str) -> str:
    return f"{location.rstrip('/')}/results/*.parquet"


def run_location(results_file: str) -> str:
    """`gs://b/nightly/d1/results/part-0.parquet` -> `gs://b/nightly/d1`."""
    return results_file.rsplit("/results/", 1)[0]


class _CompleteRunsOnly(beam.DoFn):
    """Result files of complete runs only (a run_summary.json beside them), never those under `own`."""

    def __init__(self, own: str):
        self._own = own
        self._complete: dict[str, bool] = {}

    def process(self, meta: Any) -> Iterator[str]:
        if meta.path.startswith(self._own):
            return
        location = run_location(meta.path)
        if location not in self._complete:
            self._complete[location] = FileSystems.exists(f"{location}/{SUMMARY_FILE}")
        if self._complete[location]:
            yield meta.path


class ReadDoneKeys(beam.PTransform):
    """Earlier output locations -> digests of their results for this run's model and prompt version.

    Only complete runs count as history: a location without results (e.g.
    yesterday's run failed) or without run_summary.json (killed, possibly
    while publishing, and cleared when rerun) contributes nothing. Files
    under `output` are never read: a glob such as `gs://b/nightly/*` also
    matches tonight's own output.
    """

    def __init__(self, locations: Sequence[str], run: RunInfo, output: str):
        super().__init__()
        self._patterns = [results_pattern(location) for location in locations]
        self._run = run
        self._own = output.rstrip("/") + "/"

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        run, own = self._run, self._own
        return (
            pbegin
            | "EarlierResults" >> beam.Create(self._patterns)
            | "MatchResults" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
            | "CompleteRuns" >> beam.ParDo(_CompleteRunsOnly(own))
            | "ReadKeys" >> beam.io.ReadAllFromParquet(columns=KEY_COLUMNS)
            | "SameModelAndPrompts" >> beam.Filter(
                lambda row: row["model_id"] == run.model_id and row["prompt_version"] == run.prompt_version
            )
            | "Digest" >> beam.Map(lambda row: done_key(row["content_hash"], row["task"], row["model_id"], row["prompt_version"]))
        )


class SelectTasks(beam.DoFn):
    """ImageItem -> the same item with the tasks still to run; fully answered items are dropped (counted)."""

    def __init__(self, tasks: Sequence[str], run: RunInfo):
        self._tasks = tuple(tasks)
        self._run = run
        self._done: Optional[frozenset[bytes]] = None

    def process(self, item: ImageItem, done: Iterable[bytes] = ()) -> Iterator[Any]:
        if self._done is None:
            # Built once per DoFn instance, not per bundle: in a batch job the
            # (global-window) side input is the same for every bundle.
            self._done = frozenset(done)
        run = self._run
        remaining = tuple(
            task
            for task in self._tasks
            if done_key(item.info.content_hash, task, run.model_id, run.prompt_version) not in self._done
        )
        skipped = len(self._tasks) - len(remaining)
        if skipped:
            metrics.count("skipped_tasks", skipped)
        if not remaining:
            metrics.count("skipped_items")
            return
        yield dataclasses.replace(item, tasks=remaining)
