"""Sources stage: input folders, globs and manifests -> one SourceFile per distinct matched object.

Matching goes through Beam's FileSystems, so local paths and gs:// URIs (and
any other registered filesystem) behave the same. An `--input` is taken as
people give it: a folder means its files, recursively; a glob its matches;
anything else one file. Files of folders and globs pass the user's
include/exclude patterns, and hidden files (`.DS_Store`, `.git/`) are
skipped unless asked for; a file named explicitly, or listed by a manifest,
is always read. A pattern that matches nothing, or a manifest entry that
doesn't exist, is an error row, not a silent empty run: a typo in a nightly
job's input path must show up in its counts (and fails the run's error
budget). Every URI leaves this stage in its canonical spelling
(`schemas.uris`), so ids do not depend on the working directory.

Folders and globs never read this pipeline's own outputs: a folder holding
its marker or a run summary of its own (`transforms.sinks`), and everything
under it, is skipped with a warning, so `--input junk --output junk/out`
and the next run over `junk` read the user's files only. A folder's own
listing answers this; a glob's costs one or two existence checks per
distinct folder among its matches (its listing need not show the markers).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import posixpath
import re
from typing import IO, Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes, FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from schemas.records import ItemRef, SourceFile, Stage
from schemas.uris import canonical_uri, resolve_relative
from transforms import metrics, storage
from transforms.errors import ERRORS_TAG, failure
from transforms.metadata import encode
from transforms.sinks import MARKER_FILE, SUMMARY_FILE, is_run_summary, read_json

_LOG = logging.getLogger(__name__)


class NoMatch(LookupError):
    """An --input pattern that matched no file."""


class NotFound(LookupError):
    """A manifest entry naming a file that does not exist."""


_MAGIC = re.compile(r"[*?[]")


@dataclasses.dataclass(frozen=True)
class InputSelection:
    """Which files of folders and globs are read, and how many items a trial run takes."""

    include: tuple[str, ...] = ()  # keep only files matching one of these (all files when empty)
    exclude: tuple[str, ...] = ()  # drop files matching one of these
    include_hidden: bool = False  # names starting with "." (.DS_Store, .git/, AppleDouble ._x.jpg)
    limit: Optional[int] = None  # at most this many items, the first in input order

    def keeps(self, relative_path: str) -> bool:
        """Whether a file found under a folder or glob (path relative to its root, '/'-separated) is read.

        A pattern with a '/' matches the relative path, any other the file name; the glob
        dialect is the one `--input` uses (Beam's: `*` stops at '/', `**` crosses it).
        """
        parts = relative_path.split("/")
        if not self.include_hidden and any(part.startswith(".") for part in parts):
            return False
        if self.include and not any(_matches(pattern, relative_path) for pattern in self.include):
            return False
        return not any(_matches(pattern, relative_path) for pattern in self.exclude)


def _matches(pattern: str, relative_path: str) -> bool:
    subject = relative_path if "/" in pattern else relative_path.rsplit("/", 1)[-1]
    return re.match(FileSystem.translate_pattern(pattern.strip("/")), subject) is not None


def _is_directory(path: str) -> bool:
    if path.endswith("/"):
        return True  # object-store "folder" placeholder
    return isinstance(FileSystems.get_filesystem(path), LocalFileSystem) and os.path.isdir(path)


@dataclasses.dataclass(frozen=True)
class InputEntry:
    """An `--input` (folder, glob or file), or one file a manifest lists (taken literally) with the row's other columns."""

    pattern: str
    literal: bool = False
    metadata: Optional[str] = None


def _folder(location: str) -> Optional[str]:
    """The folder a location without glob characters names, or None when it names a file (or nothing)."""
    if location.endswith("/"):
        return location.rstrip("/")
    if isinstance(FileSystems.get_filesystem(location), LocalFileSystem):
        return location if os.path.isdir(location) else None
    # Object stores have no folders: an object of that name is a file, else it may be a prefix.
    return None if FileSystems.exists(location) else location


def expand_input(pattern: str) -> tuple[str, Optional[str]]:
    """`--input` as given -> (glob to match, root the selection's relative paths start from).

    The root is None for a single named file: it is read whatever the selection says.
    """
    if _MAGIC.search(pattern):
        fixed = _MAGIC.split(pattern, 1)[0]
        return pattern, fixed[: fixed.rfind("/")] if "/" in fixed else ""
    folder = _folder(pattern)
    if folder is None:
        return pattern, None
    return f"{folder}/**", folder


class _OutputFolders:
    """Which folders hold this pipeline's output: its marker, or a run summary of its own. Each folder asked once.

    `listed`: every path under the input's root, when the listing is a whole
    folder's (the answer is then in it, no request needed); None for a glob,
    whose listing need not show a matched file's neighbours.
    """

    def __init__(self, listed: Optional[set[str]]):
        self._listed = listed
        self._known: dict[str, bool] = {}

    def _exists(self, path: str) -> bool:
        return path in self._listed if self._listed is not None else FileSystems.exists(path)

    def holds_output(self, folder: str) -> bool:
        if folder not in self._known:
            summary = f"{folder}/{SUMMARY_FILE}"
            # Another tool's run_summary.json does not hide its folder: only one with this pipeline's fields.
            self._known[folder] = self._exists(f"{folder}/{MARKER_FILE}") or (
                self._exists(summary) and is_run_summary(read_json(summary))
            )
            if self._known[folder]:
                _LOG.warning("%s is skipped: it holds this pipeline's output, which is never read as input", folder)
        return self._known[folder]

    def skips(self, path: str, root: str) -> bool:
        """Whether `path` lies in an output folder at or below `root`."""
        folder = posixpath.dirname(path)
        while len(folder) >= len(root):
            if self.holds_output(folder):
                return True
            parent = posixpath.dirname(folder)
            if parent == folder:
                return False
            folder = parent
        return False


def match_pattern(pattern: str, selection: InputSelection = InputSelection()) -> list[SourceFile]:
    """All files (not directories) an `--input` names and the selection keeps, minus output folders, sorted by URI."""
    glob, root = expand_input(pattern)
    found = [meta for meta in FileSystems.match([glob])[0].metadata_list if not _is_directory(meta.path)]
    whole_folder = root is not None and glob == f"{root}/**"
    outputs = _OutputFolders({meta.path for meta in found} if whole_folder else None)
    files = []
    for meta in found:
        if root is not None and not selection.keeps(meta.path[len(root):].lstrip("/")):
            continue
        if root is not None and outputs.skips(meta.path, root):
            continue
        files.append(SourceFile(uri=canonical_uri(meta.path), size_bytes=meta.size_in_bytes))
    return sorted(files, key=lambda f: f.uri)


def stat_literal(uri: str, metadata: Optional[str] = None) -> list[SourceFile]:
    """The one file a manifest names, taken literally (`[`, `?` and `*` are legal in object names)."""
    try:
        meta = FileSystems.get_filesystem(uri).metadata(uri)
    except Exception as exc:  # noqa: BLE001 - BeamIOError/FileNotFoundError/IOError by filesystem: all mean "not there"
        storage.raise_if_outage(exc)  # ... except storage being down
        return []
    if _is_directory(meta.path):
        return []
    return [SourceFile(uri=canonical_uri(meta.path), size_bytes=meta.size_in_bytes, metadata=metadata)]


class _MatchPattern(beam.DoFn):
    """InputEntry -> SourceFiles; literal entries come from manifests."""

    def __init__(self, selection: InputSelection):
        self._selection = selection

    def process(self, entry: InputEntry) -> Iterator[object]:
        pattern, literal = entry.pattern, entry.literal
        try:
            files = stat_literal(pattern, entry.metadata) if literal else match_pattern(pattern, self._selection)
        except Exception as exc:  # noqa: BLE001 - e.g. a bucket that doesn't exist
            yield failure(ItemRef.make(pattern), Stage.MATCH, exc)
            return
        if not files:
            missing = NotFound("manifest entry does not exist") if literal else NoMatch("no file matched (or all were excluded, or in this pipeline's output folders)")
            yield failure(ItemRef.make(pattern), Stage.MATCH, missing)
            return
        yield from files


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
                yield InputEntry(resolve_relative(entry, manifest_dir), literal=True, metadata=encode(columns))


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

    def __init__(
        self,
        patterns: Sequence[str],
        manifests: Sequence[str] = (),
        manifest_column: str = "uri",
        selection: InputSelection = InputSelection(),
    ):
        super().__init__()
        self._patterns = [canonical_uri(pattern) for pattern in patterns]
        self._manifests = [canonical_uri(manifest) for manifest in manifests]
        self._manifest_column = manifest_column
        self._selection = selection

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
        matched = patterns | "Match" >> beam.ParDo(_MatchPattern(self._selection)).with_outputs(ERRORS_TAG, main="files")
        files = (
            matched.files
            | "KeyByUri" >> beam.Map(lambda f: (f.uri, f))
            | "DistinctUri" >> beam.GroupByKey()
            | "OnePerUri" >> beam.Map(_first)
        )
        if self._selection.limit is not None:
            # Every file holds at least one item: the first `limit` files by URI hold the first `limit` items.
            files = (
                files
                | "FirstFiles" >> beam.combiners.Top.Smallest(self._selection.limit, key=lambda f: f.uri)
                | "LimitedFiles" >> beam.FlatMap(lambda kept: kept)
            )
        files = files | "CountFiles" >> beam.Map(_counted)
        errors = (matched[ERRORS_TAG], listed[ERRORS_TAG]) | "MatchErrors" >> beam.Flatten()
        return files, errors


def _counted(source: SourceFile) -> SourceFile:
    metrics.count("files_matched")
    return source
