"""Output safety: a run deletes or replaces only what it can prove it wrote, and never reads an output as input.

What this pipeline can prove it wrote, in an `--output` (`inspect`):

- its marker `.vision_batch_output.json` (`transforms.sinks.MARKER_FILE`),
  written first when a run claims the output (`claim`) and kept: it names
  the run, so a killed run's folder is recognised before it holds any table;
- a `run_summary.json` carrying every field this pipeline writes and, beside
  a marker, the marker's run id (`transforms.sinks.is_run_summary`);
- beside either of those, files named as its sink names them:
  `results/` and `errors/` `part-NNNNN-of-NNNNN.parquet`, and Beam's
  temporary `beam-temp-part-<hex>/<uuid>.part.parquet`.

Anything else is foreign, and an output holding something foreign is refused
in one line listing it, whatever the flags: nothing is deleted. Without a
marker and without a summary of ours, even files named like ours prove
nothing (another Beam job may name its files so) and are foreign too.

Checked at launch (`check`, reading only, before the model is looked at),
then again under the output's lock (`claim`), which then clears and writes:

- `--output` naming an existing file is refused.
- Another live run holding the output's lock (`pipelines.output_lock`) is
  refused, naming it; a killed run's lock is taken over.
- A finished run of ours (its summary) is refused unless `--replace_output`;
  with it, that run's files are deleted. A finished run written before
  markers existed (summary, no marker) counts as ours: its summary proves it.
- An unfinished run of ours (marker, no summary: killed, or failed before
  finalising) has its files removed: a rerun of the same command starts over.
- `--incremental_from` must not name `--output` itself. A glob that also
  matches `--output` is fine: the output is never read as history.
- An `--output` inside an `--input` folder is a warning: input matching skips
  every folder holding this pipeline's marker or summary (`transforms.sources`),
  and the marker is written before the inputs are matched.

A failed or interrupted run removes its own files (`Claim.remove_run`), and
only while the output is still its own (its run id in the marker).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import posixpath
import socket
from typing import Any, Optional, Sequence

from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.options.pipeline_options import PipelineOptions

from configuration.options import PROG, UsageError, VisionBatchOptions, split_commas
from pipelines import output_lock
from schemas.uris import canonical_uri, mask_credentials
from transforms.incremental import results_pattern, run_location
from transforms.sinks import LOCK_FILE, MARKER_FILE, SUMMARY_FILE, TABLES, is_run_summary, is_table_file, read_json
from transforms.sources import expand_input

_LOG = logging.getLogger("vision_batch")
_FIRST_PAGE = 1000
_SHOWN = 3  # foreign files named in the refusal


@dataclasses.dataclass(frozen=True)
class OutputContents:
    """What an output location holds, sorted into what this pipeline can prove it wrote and anything else."""

    ours: tuple[str, ...]  # marker, summary and table files, as proven (module docstring); full paths
    foreign: tuple[str, ...]  # anything else (paths relative to the output)
    marker: Optional[dict]  # this pipeline's marker, if there is one
    summary: Optional[dict]  # a finished run's summary, if there is one of ours

    @property
    def run_id(self) -> Optional[str]:
        """The run the output belongs to (its marker's, else a marker-less finished run's)."""
        source = self.marker or self.summary
        return source.get("run_id") if source else None


def _plausibly_ours(relative: str) -> bool:
    return relative in (MARKER_FILE, SUMMARY_FILE, LOCK_FILE) or is_table_file(relative)


def _listing(output: str) -> list[str]:
    """Paths under `output`, relative to it.

    A first page answers the common refusal (a mistyped --output naming a full
    folder or bucket) without listing all of it; a run's own files are listed whole.
    """
    def relative(limit: Optional[int]) -> list[str]:
        limits = [limit] if limit else None
        return [meta.path[len(output):].lstrip("/") for meta in FileSystems.match([f"{output}/**"], limits)[0].metadata_list]

    first = relative(_FIRST_PAGE)
    everything = first if len(first) < _FIRST_PAGE or not all(_plausibly_ours(path) for path in first) else relative(None)
    return [path for path in everything if path]


def _is_marker(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("tool") == PROG and isinstance(payload.get("run_id"), str)


def inspect(output: str) -> OutputContents:
    listed = _listing(output)
    names = set(listed)
    marker = read_json(f"{output}/{MARKER_FILE}") if MARKER_FILE in names else None
    marker = marker if _is_marker(marker) else None
    summary = read_json(f"{output}/{SUMMARY_FILE}") if SUMMARY_FILE in names else None
    if not is_run_summary(summary) or (marker is not None and summary["run_id"] != marker["run_id"]):
        summary = None
    proven = marker is not None or summary is not None
    ours, foreign = [], []
    for relative in listed:
        if relative == LOCK_FILE:
            continue  # the lock's holder owns it (pipelines.output_lock)
        mine = (
            (relative == MARKER_FILE and marker is not None)
            or (relative == SUMMARY_FILE and summary is not None)
            or (proven and is_table_file(relative))
        )
        if mine:
            ours.append(f"{output}/{relative}")
        else:
            foreign.append(relative)
    return OutputContents(tuple(sorted(ours)), tuple(sorted(foreign)), marker, summary)


def _prune_empty_folders(output: str) -> None:
    """Locally, the table folders (and Beam's temporary folders in them) the deleted files leave empty."""
    for table in TABLES:
        for folder, _, _ in os.walk(f"{output}/{table}", topdown=False):  # children before their parents
            try:
                os.rmdir(folder)  # only ever removes an empty folder: a user's file keeps its folder
            except OSError:
                continue


def _remove(output: str, files: Sequence[str]) -> None:
    # The marker goes last: whatever a deletion cut short leaves behind is still provably this pipeline's.
    marker = f"{output}/{MARKER_FILE}"
    for batch in ([path for path in files if path != marker], [path for path in files if path == marker]):
        if batch:
            FileSystems.delete(batch)
    if isinstance(FileSystems.get_filesystem(output), LocalFileSystem):
        _prune_empty_folders(output)


def _refuse(output: str, contents: OutputContents, replace: bool) -> None:
    """UsageError, with the fix, for an output holding something to keep."""
    if contents.foreign:
        shown = ", ".join(contents.foreign[:_SHOWN]) + (
            f" and {len(contents.foreign) - _SHOWN} more" if len(contents.foreign) > _SHOWN else ""
        )
        raise UsageError(
            f"--output {output} holds files this pipeline cannot prove it wrote ({shown}): nothing was deleted; "
            f"choose a new or empty folder, or move those files out of it"
        )
    if contents.summary is not None and not replace:
        raise UsageError(
            f"--output {output} already holds run {contents.summary['run_id']} (finished "
            f"{contents.summary.get('finished_at', '?')}): write to a new folder, or add --replace_output to delete that run first"
        )


def _refuse_a_file(output: str) -> None:
    filesystem = FileSystems.get_filesystem(output)
    if isinstance(filesystem, LocalFileSystem) and os.path.lexists(output) and not os.path.isdir(output):
        raise UsageError(f"--output {output} is a file, not a folder: name a new or empty folder")
    named = output.partition("://")[2].partition("/")[2]  # an object store's object name (none: a bucket)
    if not isinstance(filesystem, LocalFileSystem) and named and FileSystems.exists(output):
        raise UsageError(f"--output {output} is an object, not a folder: name a new or empty folder (prefix)")


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


def check_inputs(output: str, inputs: Sequence[str]) -> list[str]:
    """Warnings for an --output inside an --input folder or glob: it is skipped when the inputs are read."""
    warnings = []
    for pattern in inputs:
        root = expand_input(canonical_uri(pattern))[1]
        if root and output.startswith(root.rstrip("/") + "/"):
            warnings.append(
                f"--output {output} is inside --input {pattern}: it is not read as input (folders holding this "
                f"pipeline's {MARKER_FILE} or {SUMMARY_FILE} are skipped)"
            )
    return warnings


def _output(options: PipelineOptions) -> str:
    return canonical_uri(options.view_as(VisionBatchOptions).output).rstrip("/")


def check(options: PipelineOptions) -> tuple[str, ...]:
    """The launch-time checks of --output, --incremental_from and --input, reading only; returns warnings.

    Raises UsageError (one line, with the fix). `claim` repeats the output's
    checks under its lock before anything is deleted.
    """
    opts = options.view_as(VisionBatchOptions)
    output = _output(options)
    _refuse_a_file(output)
    warnings = check_incremental(output, [canonical_uri(location) for location in split_commas(opts.incremental_from)])
    warnings += check_inputs(output, opts.input or ())
    output_lock.refuse_if_held(output, options)
    _refuse(output, inspect(output), opts.replace_output)
    for warning in warnings:
        _LOG.warning(mask_credentials(warning))
    return tuple(warnings)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A run's hold on its --output: the lock, and the right to delete what the run wrote there."""

    output: str
    run_id: str
    lock: output_lock.HeldLock

    def remove_run(self) -> int:
        """Delete this run's files (a failed or interrupted run); returns how many. Foreign files stay.

        Nothing is deleted once the marker names another run (one that took over a lock this run let go stale).
        """
        contents = inspect(self.output)
        if contents.run_id != self.run_id:
            return 0
        _remove(self.output, contents.ours)
        return len(contents.ours)

    def release(self) -> None:
        self.lock.release()


def write_marker(output: str, run_id: str) -> None:
    marker = {
        "tool": PROG, "run_id": run_id, "host": socket.gethostname(),
        "claimed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with FileSystems.create(f"{output}/{MARKER_FILE}", mime_type="application/json") as handle:
        handle.write(json.dumps(marker).encode())


def claim(options: PipelineOptions, run_id: str) -> Claim:
    """Take --output for `run_id`: its lock, then (under it) the checks again, clearing an earlier run, the marker.

    The caller releases the claim when the run ends (`Claim.release`).
    """
    output = _output(options)
    lock, taken_over = output_lock.acquire(output, run_id, options)
    try:
        contents = inspect(output)
        _refuse(output, contents, options.view_as(VisionBatchOptions).replace_output)
        cleared = _clear(output, contents)
        write_marker(output, run_id)
    except BaseException:
        lock.release()
        raise
    if taken_over is not None:
        _LOG.info(mask_credentials(f"{output}: took over the lock of {taken_over.describe()}, which is no longer running"))
    if cleared:
        _LOG.info(mask_credentials(cleared))
    return Claim(output, run_id, lock)


def _clear(output: str, contents: OutputContents) -> Optional[str]:
    """Delete an earlier run of ours (checked by `_refuse` first); a line saying what went."""
    if not contents.ours:
        return None
    _remove(output, contents.ours)
    if contents.summary is not None:
        return (
            f"--replace_output: deleted run {contents.summary['run_id']} (finished "
            f"{contents.summary.get('finished_at', '?')}) from {output}: {len(contents.ours)} files"
        )
    return (
        f"{output} held an unfinished run {contents.run_id} (no {SUMMARY_FILE}: killed, interrupted or failed): "
        f"removed its {len(contents.ours)} files"
    )
