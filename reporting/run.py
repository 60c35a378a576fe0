"""A run's output location read for the report: summary, per-task figures, error breakdown, sampled items.

Works on a local directory or a `gs://` prefix through Beam's FileSystems.
Each pass reads only the columns it needs, one Parquet file at a time, and
the full rows only of the sampled items, so a nightly run's thousands of
files and millions of rows make a report without holding its text in memory.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from evaluation.storage import matching_files, read_text
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA
from tasks.builtin import DEFAULT_TASKS
from tasks.quality import DEGENERATE_FLAGS

SAMPLE_ORDERS = ("item_id", "errors_first", "spread")
EXAMPLES_PER_ERROR = 3

_STAT_COLUMNS = (
    "item_id", "task", "truncated", "prompt_tokens", "generated_tokens", "cached_tokens", "latency_ms",
    "detections", "model_id", "prompt_version", "run_id", "quality_flags", "confidence",
)
_ERROR_COLUMNS = ("item_id", "task", "stage", "error_type", "message", "model_id", "prompt_version", "run_id")


@dataclasses.dataclass(frozen=True)
class TaskStats:
    task: str
    rows: int
    truncated: int
    detections: Optional[int]  # boxes in the task's answers; None for tasks that give no boxes
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    mean_latency_ms: Optional[float]
    flagged: int = 0  # results still truncated, looped or empty after the retry ladder (tasks.quality)
    mean_confidence: Optional[float] = None  # of the results that carry one


@dataclasses.dataclass(frozen=True)
class ErrorGroup:
    stage: str
    error_type: str
    count: int
    examples: tuple[tuple[str, str], ...]  # (item_id, message), distinct messages


@dataclasses.dataclass
class SampledItem:
    item_id: str
    source_uri: str
    page: Optional[int]
    member: Optional[str]
    width: Optional[int]
    height: Optional[int]
    content_hash: Optional[str]
    metadata: Optional[str]
    results: list[dict[str, Any]]  # results rows, in task order
    errors: list[dict[str, Any]]  # errors rows


@dataclasses.dataclass
class RunData:
    location: str
    summary: dict[str, Any]  # run_summary.json, or the same keys computed from the tables
    summary_from_tables: bool  # True when the location has no run_summary.json
    tasks: list[TaskStats]
    error_groups: list[ErrorGroup]
    items_total: int  # distinct item ids in results and errors
    sample_order: str
    sample: list[SampledItem]


def table_files(location: str, table: str) -> list[str]:
    return matching_files(f"{location.rstrip('/')}/{table}/*.parquet")


def read_columns(files: Sequence[str], schema: pa.Schema, columns: Iterable[str], item_ids: Optional[set[str]] = None) -> pa.Table:
    """`columns` of every file in `schema`'s types (absent columns as nulls), optionally only rows of `item_ids`."""
    wanted = pa.schema([schema.field(name) for name in columns])
    value_set = pa.array(sorted(item_ids), pa.string()) if item_ids is not None else None
    tables = []
    for path in files:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            parquet = pq.ParquetFile(handle)
            present = [name for name in wanted.names if name in parquet.schema_arrow.names]
            table = parquet.read(columns=present)
        if value_set is not None:
            table = table.filter(pc.is_in(table.column("item_id"), value_set=value_set))
        arrays = [
            table.column(f.name).cast(f.type) if f.name in present else pa.nulls(table.num_rows, f.type) for f in wanted
        ]
        tables.append(pa.Table.from_arrays(arrays, schema=wanted))
    return pa.concat_tables(tables) if tables else wanted.empty_table()


def read_summary(location: str) -> Optional[dict[str, Any]]:
    path = f"{location.rstrip('/')}/run_summary.json"
    return json.loads(read_text(path)) if FileSystems.exists(path) else None


def _distinct(table: pa.Table, column: str) -> list[str]:
    return sorted(value for value in pc.unique(table.column(column)).to_pylist() if value is not None)


def _sum(array: pa.ChunkedArray) -> int:
    return int(pc.sum(array).as_py() or 0)


def _task_order(tasks: Iterable[str]) -> list[str]:
    known = [task for task in DEFAULT_TASKS if task in tasks]
    return known + sorted(set(tasks) - set(known))


def _flagged(results: pa.Table) -> list[int]:
    """Indexes of the rows still degenerate after their retry ladder (a quality flag of DEGENERATE_FLAGS)."""
    return [index for index, flags in enumerate(results.column("quality_flags").to_pylist())
            if any(flag in DEGENERATE_FLAGS for flag in flags or ())]


def task_stats(results: pa.Table) -> list[TaskStats]:
    stats = []
    for task in _task_order(_distinct(results, "task")):
        rows = results.filter(pc.equal(results.column("task"), task))
        latency = pc.mean(rows.column("latency_ms")).as_py()
        confidence = pc.mean(rows.column("confidence")).as_py()
        stats.append(TaskStats(
            task=task,
            rows=rows.num_rows,
            truncated=_sum(rows.column("truncated")),
            detections=_sum(pc.list_value_length(rows.column("detections"))) if rows.column("detections").null_count < rows.num_rows else None,
            prompt_tokens=_sum(rows.column("prompt_tokens")),
            generated_tokens=_sum(rows.column("generated_tokens")),
            cached_tokens=_sum(rows.column("cached_tokens")),
            mean_latency_ms=round(latency, 1) if latency is not None else None,
            flagged=len(_flagged(rows)),
            mean_confidence=round(confidence, 3) if confidence is not None else None,
        ))
    return stats


def error_groups(errors: pa.Table) -> list[ErrorGroup]:
    """Errors by (stage, error_type), most frequent first, with a few distinct example messages."""
    counts: dict[tuple[str, str], int] = {}
    examples: dict[tuple[str, str], dict[str, str]] = {}
    for item_id, stage, error_type, message in zip(
        *(errors.column(name).to_pylist() for name in ("item_id", "stage", "error_type", "message"))
    ):
        key = (stage, error_type)
        counts[key] = counts.get(key, 0) + 1
        seen = examples.setdefault(key, {})
        if len(seen) < EXAMPLES_PER_ERROR and (message or "") not in seen:
            seen[message or ""] = item_id
    return [
        ErrorGroup(stage, error_type, count, tuple((item, message) for message, item in examples[(stage, error_type)].items()))
        for (stage, error_type), count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]


def computed_summary(results: pa.Table, errors: pa.Table, item_ids: set[str], stats: Sequence[TaskStats]) -> dict[str, Any]:
    """The run_summary.json keys the report shows, from the tables of a location without one."""
    both = pa.concat_tables([results.select(["model_id", "prompt_version", "run_id"]),
                             errors.select(["model_id", "prompt_version", "run_id"])])
    task_errors = errors.filter(pc.is_valid(errors.column("task")))
    decoded = set(_distinct(results, "item_id")) | set(_distinct(task_errors, "item_id"))
    by_stage: dict[str, int] = {}
    for stage in errors.column("stage").to_pylist():
        by_stage[stage] = by_stage.get(stage, 0) + 1
    prompt = sum(s.prompt_tokens for s in stats)
    cached = sum(s.cached_tokens for s in stats)
    return {
        "run_id": ", ".join(_distinct(both, "run_id")),
        "model": {"id": ", ".join(_distinct(both, "model_id"))},
        "prompt_version": ", ".join(_distinct(both, "prompt_version")),
        "counts": {
            "items": len(decoded),
            "result_rows": results.num_rows,
            "error_rows": errors.num_rows,
            "error_rows_by_stage": dict(sorted(by_stage.items())),
            "truncated_outputs": sum(s.truncated for s in stats),
            "detections": sum(s.detections or 0 for s in stats),
        },
        "accounting": {"items_in": len(item_ids)},
        "tokens": {
            "prompt": prompt,
            "generated": sum(s.generated_tokens for s in stats),
            "cached": cached,
            "cached_fraction_of_prompt": round(cached / prompt, 4) if prompt else 0.0,
        },
    }


def choose_sample(item_ids: Sequence[str], concern: Mapping[str, int], size: int, order: str) -> list[str]:
    """A deterministic sample of `size` ids out of sorted `item_ids`.

    `item_id`: the first ones; `errors_first`: by `concern` (0 items with an
    error row, 1 with a truncated or flagged output, absent: the rest), then by id;
    `spread`: evenly spaced over the sorted ids (one folder does not fill a
    large run's sample).
    """
    if order not in SAMPLE_ORDERS:
        raise ValueError(f"unknown sample order {order!r}; choose from {SAMPLE_ORDERS}")
    if order == "errors_first":
        item_ids = sorted(item_ids, key=lambda item_id: concern.get(item_id, 2))
    if order == "spread" and len(item_ids) > size:
        return [item_ids[index * len(item_ids) // size] for index in range(size)]
    return list(item_ids[:max(0, size)])


def _sampled_items(ids: Sequence[str], results: pa.Table, errors: pa.Table) -> list[SampledItem]:
    rows: dict[str, list[dict[str, Any]]] = {item_id: [] for item_id in ids}
    failures: dict[str, list[dict[str, Any]]] = {item_id: [] for item_id in ids}
    result_rows = results.to_pylist()
    for row in result_rows:
        rows[row["item_id"]].append(row)
    for row in errors.to_pylist():
        failures[row["item_id"]].append(row)
    order = {task: index for index, task in enumerate(_task_order({row["task"] for row in result_rows}))}
    items = []
    for item_id in ids:
        answered = sorted(rows[item_id], key=lambda r: (order[r["task"]], r["created_at"]))
        first = (answered or failures[item_id])[0]
        items.append(SampledItem(
            item_id=item_id, source_uri=first["source_uri"], page=first["page"], member=first["member"],
            width=first.get("width"), height=first.get("height"), content_hash=first["content_hash"],
            metadata=first["metadata"], results=answered,
            errors=sorted(failures[item_id], key=lambda r: (r["task"] or "", r["stage"])),
        ))
    return items


def load_run(location: str, sample_size: int = 24, sample_order: str = "item_id") -> RunData:
    """Everything the report shows about `location`, except the images."""
    location = location.rstrip("/")
    results_files, errors_files = table_files(location, "results"), table_files(location, "errors")
    if not results_files and not errors_files:
        raise FileNotFoundError(f"no results or errors Parquet files under {location} (expected {location}/results/*.parquet)")
    results = read_columns(results_files, RESULTS_SCHEMA, _STAT_COLUMNS)
    errors = read_columns(errors_files, ERRORS_SCHEMA, _ERROR_COLUMNS)
    item_ids = set(_distinct(results, "item_id")) | set(_distinct(errors, "item_id"))
    truncated = _distinct(results.filter(pc.fill_null(results.column("truncated"), False)), "item_id")
    flagged = _distinct(results.take(pa.array(_flagged(results), pa.int64())), "item_id")
    concern = {**dict.fromkeys(truncated + flagged, 1), **dict.fromkeys(_distinct(errors, "item_id"), 0)}
    stats = task_stats(results)
    summary = read_summary(location)
    chosen = choose_sample(sorted(item_ids), concern, sample_size, sample_order)
    wanted = set(chosen)
    return RunData(
        location=location,
        summary=summary if summary is not None else computed_summary(results, errors, item_ids, stats),
        summary_from_tables=summary is None,
        tasks=stats,
        error_groups=error_groups(errors),
        items_total=len(item_ids),
        sample_order=sample_order,
        sample=_sampled_items(
            chosen,
            read_columns(results_files, RESULTS_SCHEMA, RESULTS_SCHEMA.names, wanted),
            read_columns(errors_files, ERRORS_SCHEMA, ERRORS_SCHEMA.names, wanted),
        ),
    )
