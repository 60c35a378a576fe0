"""Sinks stage: rows -> Parquet files under OUT/results/ and OUT/errors/.

Beam's file sink writes each bundle to a temporary file and renames the
complete set at the end, so a retried bundle never duplicates rows and a
failed run leaves no half-written final files.
"""
from __future__ import annotations

from typing import Any

import apache_beam as beam
import pyarrow as pa

from schemas.records import ErrorRecord, RunInfo
from schemas.tables import error_row
from transforms import metrics

# Row groups of ~64 MiB uncompressed: large enough for DuckDB/BigQuery scans to
# be efficient, small enough that a writer never buffers much per bundle.
ROW_GROUP_BYTES = 64 * 2**20


# Written last, after both tables are final: an output location holds a complete run exactly
# when this file is there (pipelines/summary.py writes it; incremental runs and output checks read it).
SUMMARY_FILE = "run_summary.json"


def table_prefix(output: str, table: str) -> str:
    return f"{output}/{table}/part"


class WriteTable(beam.PTransform):
    """Dict rows matching `schema` -> zstd Parquet files `OUT/<table>/part-*.parquet`."""

    def __init__(self, output: str, table: str, schema: pa.Schema, num_shards: int = 0):
        super().__init__()
        self._output = output
        self._table = table
        self._schema = schema
        self._num_shards = num_shards

    def expand(self, rows: beam.PCollection) -> Any:
        table = self._table
        return (
            rows
            | "Count" >> beam.Map(_counted, f"rows_written_{table}")
            | "WriteParquet" >> beam.io.WriteToParquet(
                table_prefix(self._output, table),
                schema=self._schema,
                # zstd: ~3x smaller than uncompressed OCR text; read by pyarrow, DuckDB, BigQuery, Spark.
                codec="zstd",
                row_group_buffer_size=ROW_GROUP_BYTES,
                # Standard LIST layout ("element"), which BigQuery and Spark expect for nested lists.
                use_compliant_nested_type=True,
                file_name_suffix=".parquet",
                num_shards=self._num_shards,  # 0: one file per bundle, chosen by the runner
            )
        )


def _counted(row: dict, counter: str) -> dict:
    metrics.count(counter)
    return row


def to_error_row(error: ErrorRecord, run: RunInfo) -> dict:
    metrics.count(f"error_rows_{error.stage}")
    metrics.count(f"error_type_{error.error_type}")
    return error_row(error, run)
