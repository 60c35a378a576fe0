"""Sources stage: input folders, globs and manifests -> one SourceFile per distinct matched object.

Matching goes through Beam's FileSystems, so local paths and gs:// URIs (and
any other registered filesystem) behave the same. An `--input` is taken as
people give it: a folder means its files, recursively; a glob its matches;
anything else one file. Files of folders and globs pass the user's
include/exclude patterns, and hidden files (`.DS_Store`, `.git/`) are
skipped unless asked for; a file named explicitly, or listed by a manifest,
is always read. Local folders are walked through symlinked folders too, as
`find -L` does (named by the path through the link; a link back into a folder
it is inside is not followed again). A pattern that matches nothing, or a
manifest entry that doesn't exist, is an error row, not a silent empty run: a
typo in a nightly job's input path must show up in its counts (and fails the
run's error budget). Every URI leaves this stage in its canonical spelling
(`schemas.uris`), so ids do not depend on the working directory.

Manifests are read as people save them: UTF-8 with or without a byte-order
mark (Excel's "CSV UTF-8"), any line ending. A CSV or Parquet manifest must
have the `--manifest_column` column and no two columns of one name; anything
else is refused (`ManifestError`) rather than read with its header as an input.

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
from apache_beam.io.filesystem import CompressionTypes, FileMetadata, FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from library import metrics, storage
from library.errors import ERRORS_TAG, failure
from library.metadata import encode
from schemas.records import ItemRef, SourceFile, Stage
from schemas.uris import canonical_uri, resolve_relative
from transforms.sinks import MARKER_FILE, SUMMARY_FILE, is_run_summary, read_json

_LOG = logging.getLogger(__name__)


class NoMatch(LookupError):
    """An --input pattern that matched no file."""


class NotFound(LookupError):
    """A manifest entry, or an --input without glob characters, naming nothing that exists."""


class ManifestError(ValueError):
    """A manifest that cannot be read as a list of inputs: not UTF-8, no URI column, duplicate column names."""


_MAGIC = re.compile(r"[*?[]")


def is_glob(pattern: str) -> bool:
    """Whether an `--input` is a glob (`*`, `**`, `?`, `[...]`) rather than a file or folder."""
    return _MAGIC.search(pattern) is not None


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
    if is_glob(pattern):
        fixed = _MAGIC.split(pattern, 1)[0]
        return pattern, fixed[: fixed.rfind("/")] if "/" in fixed else ""
    folder = _folder(pattern)
    if folder is None:
        return pattern, None
    return f"{folder}/**", folder


def _walk_local(folder: str) -> Iterator[FileMetadata]:
    """Files under a local folder, recursively, through symlinked folders, named by the path walked.

    Beam's local listing (`os.walk` without `followlinks`) skips a symlinked
    folder inside the walked one, so its files matched nothing. Followed here
    as `find -L` does: a link whose target is the folder it sits in or one of
    that folder's ancestors on the walked path (a loop) is not followed again:
    its files are read under their own names already. Entries that vanish or
    cannot be read while listing are passed over, as Beam's listing does.
    """
    pending = [(folder, frozenset({os.path.realpath(folder)}))]
    while pending:
        current, ancestors = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir():  # follows links
                    real = os.path.realpath(entry.path)
                    if real not in ancestors:
                        pending.append((entry.path, ancestors | {real}))
                elif entry.is_file():
                    stat = entry.stat()
                    yield FileMetadata(entry.path, stat.st_size, stat.st_mtime)
            except OSError:
                continue


def _list_matches(glob: str) -> list[FileMetadata]:
    """What a glob matches; local globs are listed with `_walk_local`, from the folder before the first glob character."""
    filesystem = FileSystems.get_filesystem(glob)
    if not isinstance(filesystem, LocalFileSystem) or not is_glob(glob):
        return FileSystems.match([glob])[0].metadata_list
    glob = glob + "*" if glob.endswith("/") else glob  # as Beam's match reads a trailing '/'
    fixed = _MAGIC.split(glob, 1)[0]
    return list(filesystem.match_files(_walk_local(os.path.dirname(fixed) or "/"), glob))


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
    found = [meta for meta in _list_matches(glob) if not _is_directory(meta.path)]
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
            yield failure(ItemRef.make(pattern), Stage.MATCH, nothing_found(pattern, literal))
            return
        yield from files


def nothing_found(pattern: str, literal: bool) -> LookupError:
    """Why an entry gave no file: kept apart are what does not exist and what exists but matched nothing.

    Object stores have no folders, so there a name without glob characters
    that is neither an object nor a prefix of one "matched nothing" too.
    """
    if literal:
        return NotFound("manifest entry does not exist")
    local = isinstance(FileSystems.get_filesystem(pattern), LocalFileSystem)
    if is_glob(pattern):
        return NoMatch("no file matched (or all were excluded, or in this pipeline's output folders)")
    if local and not os.path.exists(pattern):
        return NotFound("does not exist")
    if local:
        return NoMatch("folder holds no files (or all were excluded, or in this pipeline's output folders)")
    return NoMatch("no object of that name or under it as a folder")


Row = tuple[str, dict[str, Any]]  # a manifest entry and its row's other columns


def uri_column(names: Sequence[str], column: str, kind: str) -> int:
    """Where `column` is among a manifest's column names, or ManifestError naming the columns it has.

    Refused rather than guessed: a header read as an entry became an input
    ("does not exist") and every row lost its metadata; of two columns with
    one name, a row kept only the last value.
    """
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ManifestError(f"{kind} manifest has several columns named {', '.join(map(repr, duplicates))}; "
                            f"give each column its own name")
    if column not in names:
        close = [name for name in names if name.strip().lower() == column.lower()]
        hint = f"; did you mean --manifest_column {close[0]!r}?" if close else ""
        raise ManifestError(
            f"{kind} manifest has no column {column!r} (--manifest_column); its columns are "
            f"{', '.join(map(repr, names)) or 'none'}{hint} (a list of URIs alone goes in a text manifest, one per line)"
        )
    return names.index(column)


def _csv_entries(handle: IO[bytes], column: str) -> Iterator[Row]:
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which `utf-8` kept in the first column's name.
    reader = csv.reader(io.TextIOWrapper(handle, encoding="utf-8-sig", newline=""))
    header = next(reader, None)
    if header is None:
        return
    index = uri_column(header, column, "CSV")
    for row in reader:
        if len(row) > index:
            # An empty cell is no value: CSV cannot tell it from a missing one.
            yield row[index], {name: value for name, value in zip(header, row) if name != column and value != ""}


def _parquet_entries(handle: IO[bytes], column: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(handle)
    uri_column(parquet.schema_arrow.names, column, "Parquet")
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            if row[column]:
                yield row[column], {name: value for name, value in row.items() if name != column and value is not None}


def manifest_entries(uri: str, column: str = "uri") -> Iterator[InputEntry]:
    """Files a manifest lists: Parquet (`column`), CSV (`column` or the first column) or text (one per line).

    A CSV or Parquet row's other columns become the file's metadata (values
    for task instructions, written to its rows). Raises ManifestError for a
    manifest that is not one (see the module docstring).
    """
    manifest_dir = FileSystems.split(uri)[0]
    lower = uri.lower()
    with FileSystems.open(uri, compression_type=CompressionTypes.AUTO) as handle:
        if lower.endswith(".parquet"):
            entries: Iterable[Row] = _parquet_entries(handle, column)
        elif lower.endswith(".csv") or lower.endswith(".csv.gz"):
            entries = _csv_entries(handle, column)
        else:
            # utf-8-sig: a byte-order mark kept on the first line made an absolute path relative.
            entries = ((line, {}) for line in io.TextIOWrapper(handle, encoding="utf-8-sig"))
        try:
            for entry, columns in entries:
                entry = entry.strip()
                if entry and not entry.startswith("#"):
                    yield InputEntry(resolve_relative(entry, manifest_dir), literal=True, metadata=encode(columns))
        except UnicodeDecodeError as exc:
            raise ManifestError(f"manifest is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                f"save it as UTF-8 (Excel: \"CSV UTF-8\")") from None


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
