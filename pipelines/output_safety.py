"""Output safety: a run never destroys an earlier run's results, and never reads its own output as history.

Checked at launch, before any work starts:

- `--output` must be new or empty, or hold an *unfinished* run: one without
  `run_summary.json` (killed, interrupted, or failed before finalising). Its
  leftovers (Beam's temporary files, partial tables) are removed: a rerun of
  the same command starts that run over. A *finished* run (its summary is
  there) is refused unless `--replace_output` is given; files the pipeline
  does not write (anything but results/, errors/ and run_summary.json) are
  always refused, so a mistyped `--output` never deletes someone's folder.
- `--incremental_from` must not name `--output` itself. A glob that also
  matches `--output` (the nightly pattern `--output gs://b/nightly/DATE
  --incremental_from 'gs://b/nightly/*'`) is fine: the output is left out of
  the history (`transforms.incremental` skips files under it).
- An `--incremental_from` location without a complete run is a warning (log
  and summary), not an error: the first night has no history. Only complete
  runs (with run_summary.json) count as history.

Two runs writing to one `--output` at the same time are not supported.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
from typing import Optional, Sequence

from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import UsageError, VisionBatchOptions, split_commas
from schemas.uris import canonical_uri, mask_credentials
from transforms.incremental import results_pattern, run_location
from transforms.sinks import SUMMARY_FILE, TABLES

_LOG = logging.getLogger("vision_batch")
_FIRST_PAGE = 1000


@dataclasses.dataclass(frozen=True)
class OutputContents:
    """What an output location holds, sorted into the pipeline's own files and anything else."""

    ours: tuple[str, ...]  # files under results/ and errors/, and run_summary.json
    foreign: tuple[str, ...]  # anything else
    summary: Optional[dict]  # the finished run's summary, if there is one

    @property
    def empty(self) -> bool:
        return not self.ours and not self.foreign


def inspect(output: str) -> OutputContents:
    # A first page of the listing answers the common refusal (a mistyped --output naming a full
    # folder or bucket) without listing all of it; a run's own leftovers are listed whole.
    first = FileSystems.match([f"{output}/**"], limits=[_FIRST_PAGE])[0].metadata_list
    listed = first if len(first) < _FIRST_PAGE else None
    ours, foreign = [], []
    for meta in listed if listed is not None else _all_files(output, first):
        relative = meta.path[len(output):].lstrip("/")
        if _is_ours(relative):
            ours.append(meta.path)
        elif relative:
            foreign.append(meta.path)
    summary = None
    if f"{output}/{SUMMARY_FILE}" in ours:
        with FileSystems.open(f"{output}/{SUMMARY_FILE}") as handle:
            try:
                summary = json.loads(handle.read())
            except ValueError:
                summary = {}  # a summary that does not parse still marks a finished run
    return OutputContents(tuple(sorted(ours)), tuple(sorted(foreign)), summary)


def _all_files(output: str, first: list) -> list:
    if any(not _is_ours(meta.path[len(output):].lstrip("/")) for meta in first):
        return first  # enough to refuse
    return FileSystems.match([f"{output}/**"])[0].metadata_list


def _is_ours(relative: str) -> bool:
    return relative == SUMMARY_FILE or relative.split("/", 1)[0] in TABLES


def remove_run_files(output: str, files: Sequence[str]) -> None:
    """Delete a run's files; locally also the table folders they leave (Beam's temporary folders included)."""
    if isinstance(FileSystems.get_filesystem(output), LocalFileSystem):
        existing = [f"{output}/{table}" for table in TABLES if FileSystems.exists(f"{output}/{table}")]
        summary = f"{output}/{SUMMARY_FILE}"
        FileSystems.delete(existing + ([summary] if FileSystems.exists(summary) else []))
    elif files:
        FileSystems.delete(list(files))


def remove_run(output: str) -> int:
    """Delete every file this pipeline writes under `output` (a failed or interrupted run); returns how many."""
    ours = inspect(output).ours
    remove_run_files(output, ours)
    return len(ours)


def prepare_output(output: str, replace: bool) -> Optional[str]:
    """Refuse an --output that holds something to keep; clear an unfinished run's leftovers.

    Returns a line saying what was removed, if anything. Raises UsageError with the fix.
    """
    contents = inspect(output)
    if contents.foreign:
        shown = ", ".join(contents.foreign[:3]) + (f" and {len(contents.foreign) - 3} more" if len(contents.foreign) > 3 else "")
        raise UsageError(
            f"--output {output} holds files this pipeline did not write ({shown}): choose a new or empty folder"
        )
    if contents.empty:
        return None
    if contents.summary is not None:
        run = contents.summary.get("run_id", "?")
        finished = contents.summary.get("finished_at", "?")
        if not replace:
            raise UsageError(
                f"--output {output} already holds run {run} (finished {finished}): write to a new folder, "
                f"or add --replace_output to delete that run first"
            )
        remove_run_files(output, contents.ours)
        return f"--replace_output: deleted run {run} (finished {finished}) from {output}"
    remove_run_files(output, contents.ours)
    return (
        f"{output} held an unfinished run (no {SUMMARY_FILE}: killed or interrupted): "
        f"removed its {len(contents.ours)} leftover files"
    )


def check_incremental(output: str, locations: Sequence[str]) -> list[str]:
    """Refuse --incremental_from naming --output; warnings for locations without earlier results."""
    warnings = []
    for location in locations:
        if canonical_uri(location).rstrip("/") == output:
            parent = posixpath.dirname(output)
            raise UsageError(
                f"--output {output} is also an --incremental_from location: a run cannot skip against the results "
                f"it is about to replace. Give each run its own folder, e.g. --output {parent}/NEW_RUN "
                f"--incremental_from '{parent}/*' (the output itself is never read as history)"
            )
        runs = {
            run_location(meta.path) for meta in FileSystems.match([results_pattern(location)])[0].metadata_list
            if not meta.path.startswith(output + "/")
        }
        complete = {run for run in runs if FileSystems.exists(f"{run}/{SUMMARY_FILE}")}
        for unfinished in sorted(runs - complete):
            warnings.append(
                f"--incremental_from: {unfinished} holds an unfinished run (no {SUMMARY_FILE}): not used as history"
            )
        if not complete:
            warnings.append(
                f"--incremental_from {location} holds no complete earlier run: nothing is skipped on its account"
            )
    return warnings


def guard(options: PipelineOptions) -> tuple[str, ...]:
    """All launch-time checks of --output and --incremental_from; returns the warnings for the summary.

    Called before a job starts, wherever it is launched from (pipelines.vision_batch,
    the Dataflow launcher), so a relaunched nightly job clears its killed attempt the same way.
    """
    opts = options.view_as(VisionBatchOptions)
    output = canonical_uri(opts.output).rstrip("/")
    warnings = check_incremental(output, [canonical_uri(location) for location in split_commas(opts.incremental_from)])
    cleared = prepare_output(output, opts.replace_output)
    if cleared:
        _LOG.info(mask_credentials(cleared))
    for warning in warnings:
        _LOG.warning(mask_credentials(warning))
    return tuple(warnings)
