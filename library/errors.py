"""Error plumbing shared by every stage: one way to turn a failure into a counted error row.

A stage that cannot handle an input never raises for it: it emits the
failure on its `errors` output (`ERRORS_TAG`), which the pipeline flattens
into the errors table. `failure` does the three things every stage needs,
in one place: re-raise a storage outage (not the input's fault: the bundle
fails and the runner retries it, `library.storage`), count the error
(`errors_<stage>`, the progress line and Dataflow's counters), and tag the
record. `task_failure` does the same for one task of a decoded item.
"""
from __future__ import annotations

from typing import Any, Optional

from apache_beam import pvalue
from apache_beam.utils.windowed_value import WindowedValue

from library import metrics, storage
from schemas.records import ErrorRecord, ItemInfo, ItemRef, Stage

ERRORS_TAG = "errors"


def failure(ref: ItemRef, stage: Stage, exc: BaseException, at: Optional[WindowedValue] = None, **fields: Any) -> pvalue.TaggedOutput:
    """The `errors` output for `exc` (`fields`: further ErrorRecord fields).

    `at`: emit in this element's window and timestamp, for outputs made
    outside `process` (a DoFn's `finish_bundle` must give them explicitly).
    """
    storage.raise_if_outage(exc)
    metrics.count(f"errors_{stage.value}")
    record = ErrorRecord.from_exception(ref, stage, exc, **fields)
    return pvalue.TaggedOutput(ERRORS_TAG, record if at is None else at.with_value(record))


def task_failure(
    info: ItemInfo, task: str, stage: Stage, exc: BaseException, at: Optional[WindowedValue] = None, **fields: Any
) -> pvalue.TaggedOutput:
    """`failure` of one task of a decoded item: the row carries the item's hash and metadata."""
    return failure(info.ref, stage, exc, at, task=task, content_hash=info.content_hash, metadata=info.metadata, **fields)
