"""Synthetic result history for the incremental benchmark: real result rows, replicated with fresh hashes.

A history of N rows looks like N rows of earlier nights written by the
pipeline's own sink: the results schema, zstd, row groups of the sink's byte
size, one directory per night (`night-000/results/part-00000.parquet`, ...).
Every row is a copy of a real result row (from a real run of the benchmark's
input) under a fresh content hash and item id, so the bytes per row, the
dictionary-friendly columns and the incompressible hashes are what a real
history has. Rows are built and written one row group at a time: generating
10 M rows holds one row group in memory, whatever N is.

A few planted rows answer the current input's items (see `Plan`), so the
benchmark can check each run skipped exactly what it should.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import pathlib
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.workload import cached_directory
from schemas.tables import RESULTS_SCHEMA
from transforms.sinks import ROW_GROUP_BYTES

# Bump when the generator writes different rows: it names the cache directory.
HISTORY_VERSION = "2"  # 2: results rows carry task fingerprints (part of the incremental key)
NIGHT_ROWS = 1_000_000  # a nightly run of ~330 k items x 3 tasks
FILE_ROWS = 250_000  # rows per Parquet file, as a Dataflow run writes one file per bundle
OTHER_MODEL = "another-model"
OTHER_PROMPT_VERSION = "v0-earlier"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which current items the planted rows answer, and what a run must therefore skip.

    Items are the template run's items in item-id order, cut in four: the
    first quarter has all its tasks answered, the second only its first task,
    the third has answers from another model and another prompt version (not
    reusable), the rest nothing.
    """

    full: tuple[str, ...]  # content hashes answered for every task
    partial: tuple[str, ...]  # content hashes answered for `first_task` only
    foreign: tuple[str, ...]  # content hashes answered by another model / prompt version
    tasks: tuple[str, ...]

    @property
    def first_task(self) -> str:
        return self.tasks[0]

    @property
    def expected_skipped_items(self) -> int:
        return len(self.full)

    @property
    def expected_skipped_tasks(self) -> int:
        return len(self.full) * len(self.tasks) + len(self.partial)

    @staticmethod
    def of(template: pa.Table) -> "Plan":
        by_item: dict[str, str] = {}
        for row in template.select(["item_id", "content_hash"]).to_pylist():
            by_item[row["item_id"]] = row["content_hash"]
        hashes = [by_item[item] for item in sorted(by_item)]
        quarter = len(hashes) // 4
        tasks = tuple(sorted(set(template.column("task").to_pylist())))
        return Plan(tuple(hashes[:quarter]), tuple(hashes[quarter: 2 * quarter]), tuple(hashes[2 * quarter: 3 * quarter]), tasks)


def planted_rows(template: pa.Table, plan: Plan) -> pa.Table:
    """The template's own rows for the planned items: reusable answers, and foreign ones that must not be reused."""
    rows = template.to_pylist()
    planted = [row for row in rows if row["content_hash"] in plan.full]
    planted += [row for row in rows if row["content_hash"] in plan.partial and row["task"] == plan.first_task]
    foreign = [row for row in rows if row["content_hash"] in plan.foreign]
    planted += [dict(row, model_id=OTHER_MODEL) for row in foreign]
    planted += [dict(row, prompt_version=OTHER_PROMPT_VERSION) for row in foreign]
    return pa.Table.from_pylist(planted, schema=RESULTS_SCHEMA)


def rows_per_group(template: pa.Table) -> int:
    """Rows the sink puts in one row group: it flushes once its buffered batches reach ROW_GROUP_BYTES."""
    return max(1000, ROW_GROUP_BYTES // max(1, template.nbytes // template.num_rows))


def replicated(template: pa.Table, first_item: int, rows: int, night: int) -> tuple[pa.Table, int]:
    """`rows` copies of the template's rows, item by item, each item under a fresh hash and id; the next item number.

    Synthetic item k copies template item k mod n with all its task rows, so a
    history has the template's mix of tasks and text lengths.
    """
    per_item = _rows_by_item(template)
    indices: list[int] = []
    hashes: list[str] = []
    ids: list[str] = []
    item = first_item
    while len(indices) < rows:
        content_hash = hashlib.sha256(f"history:{item}".encode()).hexdigest()
        item_id = f"gs://synthetic-archive/night-{night:03d}/{item:09d}.png"
        for index in per_item[item % len(per_item)][: rows - len(indices)]:
            indices.append(index)
            hashes.append(content_hash)
            ids.append(item_id)
        item += 1
    table = template.take(pa.array(indices, type=pa.int64()))
    stamp = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(days=night)
    replace = {
        "item_id": pa.array(ids, type=pa.string()),
        "source_uri": pa.array(ids, type=pa.string()),
        "content_hash": pa.array(hashes, type=pa.string()),
        "run_id": pa.array([f"night-{night:03d}"] * rows, type=pa.string()),
        "created_at": pa.array([stamp] * rows, type=pa.timestamp("us", tz="UTC")),
    }
    for name, column in replace.items():
        table = table.set_column(table.schema.get_field_index(name), RESULTS_SCHEMA.field(name), column)
    return table, item


def _rows_by_item(template: pa.Table) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(template.column("item_id").to_pylist()):
        groups.setdefault(item, []).append(index)
    return [groups[item] for item in sorted(groups)]


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(size, total - start)


def _write_file(path: pathlib.Path, tables: Iterator[pa.Table]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, RESULTS_SCHEMA, compression="zstd", use_compliant_nested_type=True) as writer:
        for table in tables:
            writer.write_table(table, row_group_size=table.num_rows)


def write_history(root: pathlib.Path, rows: int, template: pa.Table, plan: Plan) -> pathlib.Path:
    """A directory of nights holding `rows` result rows in all, planted rows included (cached).

    The planted rows sit in the last night, after everything else a scan reads in order.
    """
    planted = planted_rows(template, plan) if rows else template.schema.empty_table()
    key = hashlib.sha256(b"".join(h.encode() for h in sorted(set(template.column("content_hash").to_pylist())))).hexdigest()[:12]
    group = rows_per_group(template)

    def build(staging: pathlib.Path) -> None:
        item = 0

        def groups(file_rows: int, night: int) -> Iterator[pa.Table]:
            nonlocal item
            for _, group_rows in _chunks(file_rows, group):
                table, item = replicated(template, item, group_rows, night)
                yield table

        nights = list(_chunks(max(0, rows - planted.num_rows), NIGHT_ROWS)) or [(0, 0)]
        for night, (_, night_rows) in enumerate(nights):
            for part, (_, file_rows) in enumerate(_chunks(night_rows, FILE_ROWS)):
                _write_file(staging / f"night-{night:03d}" / "results" / f"part-{part:05d}.parquet", groups(file_rows, night))
        if planted.num_rows:
            _write_file(staging / f"night-{len(nights) - 1:03d}" / "results" / "part-planted.parquet", iter([planted]))

    return cached_directory(root / f"history-v{HISTORY_VERSION}-{key}-{rows}", build)


def history_rows(directory: pathlib.Path) -> int:
    """Rows in a history directory, from the Parquet footers."""
    return sum(pq.ParquetFile(path).metadata.num_rows for path in sorted(directory.glob("night-*/results/*.parquet")))
