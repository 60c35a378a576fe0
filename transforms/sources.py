"""Sources stage: input globs -> one SourceFile per distinct matched object.

Matching goes through Beam's FileSystems, so local paths and gs:// URIs (and
any other registered filesystem) behave the same. A pattern that matches
nothing is an error row, not a silent empty run: a typo in a nightly job's
input path must show up in its counts.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from schemas.records import ErrorRecord, ItemRef, SourceFile
from transforms import metrics

ERRORS_TAG = "errors"


def _is_directory(path: str) -> bool:
    if path.endswith("/"):
        return True  # object-store "folder" placeholder
    return isinstance(FileSystems.get_filesystem(path), LocalFileSystem) and os.path.isdir(path)


def match_pattern(pattern: str) -> list[SourceFile]:
    """All files (not directories) a glob matches, sorted by URI."""
    result = FileSystems.match([pattern])[0]
    files = [
        SourceFile(uri=meta.path, size_bytes=meta.size_in_bytes)
        for meta in result.metadata_list
        if not _is_directory(meta.path)
    ]
    return sorted(files, key=lambda f: f.uri)


class _MatchPattern(beam.DoFn):
    def process(self, pattern: str) -> Iterator[object]:
        try:
            files = match_pattern(pattern)
        except Exception as exc:  # noqa: BLE001 - e.g. a bucket that doesn't exist
            metrics.count("errors_match")
            yield pvalue.TaggedOutput(ERRORS_TAG, ErrorRecord.from_exception(ItemRef.make(pattern), "match", exc))
            return
        if not files:
            metrics.count("errors_match")
            yield pvalue.TaggedOutput(
                ERRORS_TAG,
                ErrorRecord(ref=ItemRef.make(pattern), stage="match", error_type="NoMatch", message="pattern matched no files"),
            )
            return
        yield from files


def _first(uri_and_files: tuple[str, Iterable[SourceFile]]) -> SourceFile:
    return next(iter(uri_and_files[1]))


class MatchInputs(beam.PTransform):
    """Globs -> SourceFile (main output) and ErrorRecord (`errors`).

    Files matched by several overlapping globs are processed once. The
    group-by-URI also redistributes files across workers, so one worker
    doesn't match and then decode an entire bucket listing.
    """

    def __init__(self, patterns: Sequence[str]):
        super().__init__()
        self._patterns = list(patterns)

    def expand(self, pbegin: beam.pvalue.PBegin) -> pvalue.DoOutputsTuple:
        matched = (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "Match" >> beam.ParDo(_MatchPattern()).with_outputs(ERRORS_TAG, main="files")
        )
        files = (
            matched.files
            | "KeyByUri" >> beam.Map(lambda f: (f.uri, f))
            | "DistinctUri" >> beam.GroupByKey()
            | "OnePerUri" >> beam.Map(_first)
            | "CountFiles" >> beam.Map(_counted)
        )
        return files, matched[ERRORS_TAG]


def _counted(source: SourceFile) -> SourceFile:
    metrics.count("files_matched")
    return source
