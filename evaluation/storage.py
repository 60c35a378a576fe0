"""Reading and writing evaluation inputs and outputs through Beam's FileSystems.

The same code path reads `out/run1/results/*.parquet` on a laptop and
`gs://bucket/runs/2026-05-01/results/*.parquet` written by Dataflow, with
the credentials Beam already uses; nothing here knows which it is.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from schemas.records import SourceFile
from schemas.references import REFERENCES_SCHEMA, ReferenceItem, reference_from_row, reference_row
from transforms.sources import manifest_entries, match_pattern, stat_literal

_GLOB_CHARS = "*?["


def _open(uri: str):
    return FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED)


def read_text(uri: str) -> str:
    with _open(uri) as handle:
        return handle.read().decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Create or replace `uri`; local parent folders are made (object stores have none)."""
    if isinstance(FileSystems.get_filesystem(uri), LocalFileSystem):
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    with FileSystems.create(uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def matching_files(pattern: str) -> list[str]:
    """Files a glob matches (sorted); a plain path that exists matches itself."""
    return sorted(meta.path for meta in FileSystems.match([pattern])[0].metadata_list)


def match_sources(patterns: Sequence[str], manifests: Sequence[str] = (), manifest_column: str = "uri") -> list[SourceFile]:
    """Distinct files named by globs and manifests, resolved as the pipeline resolves them.

    The pipeline records an empty glob or a missing manifest entry as an
    error row; here, where a person is waiting for an evaluation set, it
    stops the command instead.
    """
    sources: dict[str, SourceFile] = {}
    named = [(pattern, match_pattern) for pattern in patterns]
    named += [(entry, stat_literal) for manifest in manifests for entry in manifest_entries(manifest, manifest_column)]
    for name, resolve in named:
        matched = resolve(name)
        if not matched:
            raise FileNotFoundError(f"{name} matched no files")
        sources.update((source.uri, source) for source in matched)
    return [sources[uri] for uri in sorted(sources)]


def _is_run_location(location: str) -> bool:
    return not (location.endswith(".parquet") or any(c in location for c in _GLOB_CHARS))


def results_files(location: str) -> list[str]:
    """Parquet files of a results location: a run's OUT, or an explicit file or glob."""
    pattern = f"{location.rstrip('/')}/results/*.parquet" if _is_run_location(location) else location
    files = matching_files(pattern)
    if not files:
        raise FileNotFoundError(f"no results Parquet files at {pattern}")
    return files


def errors_files(location: str) -> list[str]:
    """The errors table's files of a run's OUT (none for an explicit results glob)."""
    return matching_files(f"{location.rstrip('/')}/errors/*.parquet") if _is_run_location(location) else []


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`'s column order and types; absent nullable columns become nulls.

    Hand-made reference files may carry only the columns they have; a file
    that lacks a required column or has incompatible types fails here, by name.
    """
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"Parquet file lacks the required column {field.name!r}")
    return pa.Table.from_arrays(columns, schema=schema)


def read_parquet(files: Sequence[str], schema: pa.Schema) -> pa.Table:
    """Several Parquet files as one table in `schema`."""
    tables = []
    for uri in files:
        with _open(uri) as handle:
            # pre_buffer off: with it, pyarrow's I/O threads can still hold the Python file
            # object's buffers when the interpreter exits, and the process aborts
            # ("terminate called without an active exception", exit code 134) in ~1 of 3 runs.
            tables.append(_conform(pq.read_table(handle, pre_buffer=False), schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def write_parquet(uri: str, rows: Iterable[dict[str, Any]], schema: pa.Schema) -> int:
    """Rows as one zstd Parquet file (the pipeline's codec and nested-list layout); returns the row count."""
    table = pa.Table.from_pylist(list(rows), schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", use_compliant_nested_type=True)
    write_bytes(uri, buffer.getvalue())
    return table.num_rows


def _is_jsonl(uri: str) -> bool:
    return uri.endswith((".jsonl", ".json", ".ndjson"))


def read_references(pattern: str) -> list[ReferenceItem]:
    """A reference set from Parquet or JSON Lines files (by extension); one item id may appear once."""
    files = matching_files(pattern)
    if not files:
        raise FileNotFoundError(f"no reference files at {pattern}")
    rows: list[dict[str, Any]] = []
    for uri in files:
        if _is_jsonl(uri):
            for number, line in enumerate(read_text(uri).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{uri} line {number}: not JSON ({exc})") from None
        else:
            rows.extend(read_parquet([uri], REFERENCES_SCHEMA).to_pylist())
    items = [reference_from_row(row) for row in rows]
    seen: set[str] = set()
    for item in items:
        if item.ref.item_id in seen:
            raise ValueError(f"reference item {item.ref.item_id} appears more than once in {pattern}")
        seen.add(item.ref.item_id)
    return items


def write_references(uri: str, items: Sequence[ReferenceItem]) -> int:
    """Parquet, or JSON Lines when `uri` ends in .jsonl/.json/.ndjson."""
    rows = [reference_row(item) for item in items]
    if _is_jsonl(uri):
        write_text(uri, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return len(rows)
    return write_parquet(uri, rows, REFERENCES_SCHEMA)
