"""Sources stage: input globs and manifests -> one SourceFile per distinct matched object.

Matching goes through Beam's FileSystems, so local paths and gs:// URIs (and
any other registered filesystem) behave the same. A pattern that matches
nothing, or a manifest entry that doesn't exist, is an error row, not a
silent empty run: a typo in a nightly job's input path must show up in its
counts.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import IO, Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from schemas.records import ItemRef, SourceFile, Stage
from transforms import metrics, storage
from transforms.errors import ERRORS_TAG, failure
from transforms.metadata import encode


class NoMatch(LookupError):
    """An --input pattern that matched no file."""


class NotFound(LookupError):
    """A manifest entry naming a file that does not exist."""


def _is_directory(path: str) -> bool:
    if path.endswith("/"):
        return True  # object-store "folder" placeholder
    return isinstance(FileSystems.get_filesystem(path), LocalFileSystem) and os.path.isdir(path)


@dataclasses.dataclass(frozen=True)
class InputEntry:
    """An `--input` glob, or one file a manifest lists (taken literally) with the row's other columns."""

    pattern: str
    literal: bool = False
    metadata: Optional[str] = None


def match_pattern(pattern: str) -> list[SourceFile]:
    """All files (not directories) a glob matches, sorted by URI."""
    result = FileSystems.match([pattern])[0]
    files = [
        SourceFile(uri=meta.path, size_bytes=meta.size_in_bytes)
        for meta in result.metadata_list
        if not _is_directory(meta.path)
    ]
    return sorted(files, key=lambda f: f.uri)


def stat_literal(uri: str, metadata: Optional[str] = None) -> list[SourceFile]:
    """The one file a manifest names, taken literally (`[`, `?` and `*` are legal in object names)."""
    try:
        meta = FileSystems.get_filesystem(uri).metadata(uri)
    except Exception as exc:  # noqa: BLE001 - BeamIOError/FileNotFoundError/IOError by filesystem: all mean "not there"
        storage.raise_if_outage(exc)  # ... except storage being down
        return []
    return [] if _is_directory(meta.path) else [SourceFile(uri=meta.path, size_bytes=meta.size_in_bytes, metadata=metadata)]


class _MatchPattern(beam.DoFn):
    """InputEntry -> SourceFiles; literal entries come from manifests."""

    def process(self, entry: InputEntry) -> Iterator[object]:
        pattern, literal = entry.pattern, entry.literal
        try:
            files = stat_literal(pattern, entry.metadata) if literal else match_pattern(pattern)
        except Exception as exc:  # noqa: BLE001 - e.g. a bucket that doesn't exist
            yield failure(ItemRef.make(pattern), Stage.MATCH, exc)
            return
        if not files:
            missing = NotFound("manifest entry does not exist") if literal else NoMatch("pattern matched no files")
            yield failure(ItemRef.make(pattern), Stage.MATCH, missing)
            return
        yield from files


def _resolve(entry: str, manifest_dir: str) -> str:
    """Manifest entries may be relative to the manifest's own location."""
    if "://" in entry or os.path.isabs(entry):
        return entry
    return FileSystems.join(manifest_dir, entry)


Row = tuple[str, dict[str, Any]]  # a manifest entry and its row's other columns


def _csv_entries(handle: IO[bytes], column: str) -> Iterator[Row]:
    reader = csv.reader(io.TextIOWrapper(handle, encoding="utf-8", newline=""))
    header = next(reader, None)
    if header is None:
        return
    if column not in header:
        # No header row: the first line is an entry, and no column has a name to be used by.
        yield from ((row[0], {}) for row in [header, *reader] if row)
        return
    index = header.index(column)
    for row in reader:
        if len(row) > index:
            # An empty cell is no value: CSV cannot tell it from a missing one.
            yield row[index], {name: value for name, value in zip(header, row) if name != column and value != ""}


def _parquet_entries(handle: IO[bytes], column: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(handle)
    if column not in parquet.schema_arrow.names:
        raise ValueError(f"manifest has no column {column!r} (--manifest_column); columns: {parquet.schema_arrow.names}")
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            if row[column]:
                yield row[column], {name: value for name, value in row.items() if name != column and value is not None}


def manifest_entries(uri: str, column: str = "uri") -> Iterator[InputEntry]:
    """Files a manifest lists: Parquet (`column`), CSV (`column` or the first column) or text (one per line).

    A CSV or Parquet row's other columns become the file's metadata (values
    for task instructions, written to its rows).
    """
    manifest_dir = FileSystems.split(uri)[0]
    lower = uri.lower()
    with FileSystems.open(uri, compression_type=CompressionTypes.AUTO) as handle:
        if lower.endswith(".parquet"):
            entries: Iterable[Row] = _parquet_entries(handle, column)
        elif lower.endswith(".csv") or lower.endswith(".csv.gz"):
            entries = _csv_entries(handle, column)
        else:
            entries = ((line.decode("utf-8"), {}) for line in handle)
        for entry, columns in entries:
            entry = entry.strip()
            if entry and not entry.startswith("#"):
                yield InputEntry(_resolve(entry, manifest_dir), literal=True, metadata=encode(columns))


class _ReadManifest(beam.DoFn):
    def __init__(self, column: str):
        self._column = column

    def process(self, uri: str) -> Iterator[object]:
        try:
            yield from manifest_entries(uri, self._column)
        except Exception as exc:  # noqa: BLE001 - an unreadable manifest is an error row, not a failed job
            yield failure(ItemRef.make(uri), Stage.MATCH, exc)


def _first(uri_and_files: tuple[str, Iterable[SourceFile]]) -> SourceFile:
    """One SourceFile per URI, the same on every run: a manifest row's columns before none, then the smallest."""
    return min(uri_and_files[1], key=lambda f: (f.metadata is None, f.metadata or ""))


class MatchInputs(beam.PTransform):
    """Globs and manifests -> SourceFile (main output) and ErrorRecord (`errors`).

    Files matched by several overlapping globs are processed once. The
    group-by-URI also redistributes files across workers, so one worker
    doesn't match and then decode an entire bucket listing.
    """

    def __init__(self, patterns: Sequence[str], manifests: Sequence[str] = (), manifest_column: str = "uri"):
        super().__init__()
        self._patterns = list(patterns)
        self._manifests = list(manifests)
        self._manifest_column = manifest_column

    def expand(self, pbegin: beam.pvalue.PBegin) -> tuple[beam.PCollection, beam.PCollection]:
        listed = (
            pbegin
            | "Manifests" >> beam.Create(self._manifests)
            | "ReadManifests" >> beam.ParDo(_ReadManifest(self._manifest_column)).with_outputs(ERRORS_TAG, main="entries")
        )
        patterns = (
            (
                pbegin | "Patterns" >> beam.Create([InputEntry(pattern) for pattern in self._patterns]),
                listed.entries | "FanOutListed" >> beam.Reshuffle(),
            )
            | "AllPatterns" >> beam.Flatten()
        )
        matched = patterns | "Match" >> beam.ParDo(_MatchPattern()).with_outputs(ERRORS_TAG, main="files")
        files = (
            matched.files
            | "KeyByUri" >> beam.Map(lambda f: (f.uri, f))
            | "DistinctUri" >> beam.GroupByKey()
            | "OnePerUri" >> beam.Map(_first)
            | "CountFiles" >> beam.Map(_counted)
        )
        errors = (matched[ERRORS_TAG], listed[ERRORS_TAG]) | "MatchErrors" >> beam.Flatten()
        return files, errors


def _counted(source: SourceFile) -> SourceFile:
    metrics.count("files_matched")
    return source
