"""Sinks stage: rows -> Parquet files under OUT/results/ and OUT/errors/, reporting what they wrote.

Beam's file sink writes each bundle to a temporary file and renames the
complete set at the end, so a retried bundle never duplicates rows and no
file is half-written. The two tables are renamed one after the other, so a
run can fail with one table in place: the launcher then removes what the
run wrote (`pipelines.output_safety`'s `Claim.remove_run`: only files it can
prove it wrote, named as `is_table_file` says, never a user's file beside them).

`WriteTable` returns one `WrittenFile` (final path, rows) per file, counted
by the writer as it wrote them: the run summary lists them without opening
a file.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterator, Mapping

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import iobase
from apache_beam.io.filebasedsink import FileBasedSink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import window

from library import metrics
from schemas.records import ErrorRecord, RunInfo
from schemas.tables import error_row

# Row groups of ~64 MiB uncompressed: large enough for DuckDB/BigQuery scans to
# be efficient, small enough that a writer never buffers much per bundle.
ROW_GROUP_BYTES = 64 * 2**20
# Rows are converted to Arrow this many at a time; the row group is their concatenation.
ARROW_BATCH_ROWS = 1000
TABLES = ("results", "errors")
# Written last, after both tables are final: an output location holds a complete run exactly
# when this file is there (transforms/summary.py writes it; incremental runs and output checks read it).
SUMMARY_FILE = "run_summary.json"
# Written first, when a run claims its --output (pipelines/output_safety.py), and kept: it proves the
# folder is this pipeline's output even before any table file exists, and input matching skips every
# folder holding it (sources.py). Hidden, so a folder listing of results does not show it.
MARKER_FILE = ".vision_batch_output.json"
# Held while a run writes to --output (pipelines/output_lock.py), removed when it ends.
LOCK_FILE = ".vision_batch.lock"
# The names Beam's file sink gives this pipeline's tables (`table_prefix`, suffix .parquet): final
# shards `part-00000-of-00004.parquet` (Beam's DEFAULT_SHARD_NAME_TEMPLATE), and temporary files
# `beam-temp-part-<uuid1 hex>/<uuid4>.part.parquet` (FileBasedSink._create_temp_dir, open_writer).
_TABLE_FILE = re.compile(
    r"(?:%s)/(?:part-\d{5,}-of-\d{5,}\.parquet|beam-temp-part-[0-9a-f]{32}/[0-9a-f-]{36}\.part\.parquet)"
    % "|".join(TABLES)
)
# Top-level fields every run summary carries (transforms/summary.py `build_summary`): a run_summary.json
# without them was not written by this pipeline.
SUMMARY_FIELDS = ("run_id", "state", "state_reason", "counts", "accounting", "outputs", "config", "versions")


def table_prefix(output: str, table: str) -> str:
    return f"{output}/{table}/part"


def is_table_file(relative: str) -> bool:
    """Whether a path relative to an output is named as this pipeline's sink names its table files."""
    return _TABLE_FILE.fullmatch(relative) is not None


def read_json(path: str) -> Any:
    """A small JSON file of an output (its marker, its summary); None when it is not JSON, so not ours."""
    try:
        with FileSystems.open(path) as handle:
            return json.loads(handle.read())
    except ValueError:
        return None


def is_run_summary(payload: Any) -> bool:
    """Whether a parsed run_summary.json is one this pipeline wrote: every field it always writes, a run id."""
    return (
        isinstance(payload, Mapping)
        and all(field in payload for field in SUMMARY_FIELDS)
        and isinstance(payload["run_id"], str)
        and bool(payload["run_id"])
    )


@dataclasses.dataclass(frozen=True)
class WrittenFile:
    """One final Parquet file of a table and the rows its writer put in it."""

    path: str
    rows: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "WrittenFile":
        return WrittenFile(**json.loads(text))


@dataclasses.dataclass(frozen=True)
class _WrittenPart:
    """A writer's result: its temporary file and how many rows it holds."""

    temp_path: str
    rows: int


class _RowCountingWriter(iobase.Writer):
    """Beam's file writer, counting the rows of the Arrow tables written through it."""

    def __init__(self, inner: iobase.Writer):
        self._inner = inner
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        self._inner.write(table)
        self._rows += table.num_rows

    def at_capacity(self) -> bool:
        return self._inner.at_capacity()

    def close(self) -> _WrittenPart:
        return _WrittenPart(self._inner.close(), self._rows)


class _ParquetTableSink(FileBasedSink):
    """Arrow tables -> zstd Parquet files, through Beam's atomic file sink; finalising yields WrittenFile JSON.

    Beam's sink API lets a writer's `close` return any record of what it
    wrote; this one returns its rows with its temporary path, and
    `finalize_write` pairs them with the final names Beam renames the
    temporary files to (in the same sorted order). Beam types the sink's
    output as `str`, hence the JSON.
    """

    def __init__(self, file_path_prefix: str, schema: pa.Schema, num_shards: int):
        super().__init__(
            file_path_prefix,
            coder=None,
            file_name_suffix=".parquet",
            num_shards=num_shards,  # 0: one file per bundle, chosen by the runner
            mime_type="application/x-parquet",
            compression_type=CompressionTypes.UNCOMPRESSED,  # Parquet compresses its own pages
        )
        self._schema = schema

    def open(self, temp_path: str) -> tuple[Any, pq.ParquetWriter]:
        handle = super().open(temp_path)
        writer = pq.ParquetWriter(
            handle,
            self._schema,
            # zstd: ~3x smaller than uncompressed OCR text; read by pyarrow, DuckDB, BigQuery, Spark.
            compression="zstd",
            # Standard LIST layout ("element"), which BigQuery and Spark expect for nested lists.
            use_compliant_nested_type=True,
        )
        return handle, writer

    def write_record(self, file_handle: tuple[Any, pq.ParquetWriter], table: pa.Table) -> None:
        file_handle[1].write_table(table)

    def close(self, file_handle: tuple[Any, pq.ParquetWriter]) -> None:
        handle, writer = file_handle
        writer.close()
        handle.close()

    def open_writer(self, init_result: Any, uid: str) -> _RowCountingWriter:
        return _RowCountingWriter(super().open_writer(init_result, uid))

    def finalize_write(self, init_result: Any, writer_results: Any, pre_finalize_results: Any) -> Iterator[str]:
        parts = sorted(writer_results, key=lambda part: part.temp_path)
        # Beam renames the sorted temporary files to shard names 0..n-1 (skipping those a retry already renamed).
        for _ in super().finalize_write(init_result, [part.temp_path for part in parts], pre_finalize_results):
            pass
        for shard, part in enumerate(parts):
            yield WrittenFile(self._get_final_name(shard, len(parts)), part.rows).to_json()


class _RowsToTables(beam.DoFn):
    """Dict rows -> Arrow tables of about ROW_GROUP_BYTES each (one per row group), per bundle."""

    def __init__(self, schema: pa.Schema):
        self._schema = schema
        self._rows: list[dict] = []
        self._batches: list[pa.RecordBatch] = []
        self._bytes = 0

    def start_bundle(self) -> None:
        self._rows, self._batches, self._bytes = [], [], 0

    def process(self, row: dict) -> Iterator[pa.Table]:
        self._rows.append(row)
        if len(self._rows) >= ARROW_BATCH_ROWS:
            yield from self._flush(ROW_GROUP_BYTES)

    def finish_bundle(self) -> Iterator[Any]:
        for table in self._flush(0):
            yield window.GlobalWindows.windowed_value_at_end_of_window(table)

    def _flush(self, threshold: int) -> Iterator[pa.Table]:
        if self._rows:
            batch = pa.RecordBatch.from_pylist(self._rows, schema=self._schema)
            self._rows = []
            self._batches.append(batch)
            self._bytes += batch.nbytes
        if self._batches and self._bytes >= threshold:
            table = pa.Table.from_batches(self._batches, schema=self._schema)
            self._batches, self._bytes = [], 0
            yield table


class WriteTable(beam.PTransform):
    """Dict rows matching `schema` -> zstd Parquet files `OUT/<table>/part-*.parquet` -> one WrittenFile each."""

    def __init__(self, output: str, table: str, schema: pa.Schema, num_shards: int = 0):
        super().__init__()
        self._output = output
        self._table = table
        self._schema = schema
        self._num_shards = num_shards

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        table = self._table
        return (
            rows
            | "Count" >> beam.Map(_counted, f"rows_written_{table}")
            | "ToArrow" >> beam.ParDo(_RowsToTables(self._schema))
            | "WriteParquet" >> beam.io.Write(_ParquetTableSink(table_prefix(self._output, table), self._schema, self._num_shards))
            | "WrittenFiles" >> beam.Map(WrittenFile.from_json)
        )


def _counted(row: dict, counter: str) -> dict:
    metrics.count(counter)
    return row


def to_error_row(error: ErrorRecord, run: RunInfo) -> dict:
    metrics.count(f"error_rows_{error.stage.value}")
    metrics.count(f"error_type_{error.error_type}")
    return error_row(error, run)
