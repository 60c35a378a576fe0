"""A results location loaded for scoring: its answers keyed by (item, task), and its provenance.

Any run that writes the pipeline's results schema loads the same way: a
pipeline run on Dataflow, a local run, or a baseline OCR engine
(`evaluation.baselines`).
"""
from __future__ import annotations

import dataclasses
import posixpath
from typing import Any, Mapping, Optional

from evaluation.storage import errors_files, read_parquet, results_files
from schemas.records import ItemRef
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA

MATCH_MODES = ("item_id", "name")


def item_key(ref: ItemRef, match: str) -> str:
    """Join key of an item: its item_id, or with `name` the file name instead of the full URI.

    `name` lets references built from local copies (`/data/evalset/a.pdf`)
    score a run that read the same files from `gs://bucket/evalset/a.pdf`.
    """
    if match == "item_id":
        return ref.item_id
    if match == "name":
        return ItemRef.make(posixpath.basename(ref.source_uri), page=ref.page, member=ref.member).item_id
    raise ValueError(f"unknown match mode {match!r}; choose from {MATCH_MODES}")


def claim_key(owners: dict[str, str], ref: ItemRef, match: str) -> str:
    """`item_key`, refusing two different items that share it (same file name in two folders)."""
    key = item_key(ref, match)
    owner = owners.setdefault(key, ref.item_id)
    if owner != ref.item_id:
        raise ValueError(f"--match {match}: {ref.item_id} and {owner} share the key {key!r}; use --match item_id")
    return key


@dataclasses.dataclass(frozen=True)
class RunResults:
    location: str
    label: str  # short name for report columns
    model_ids: tuple[str, ...]
    prompt_versions: tuple[str, ...]
    run_ids: tuple[str, ...]
    rows: Mapping[tuple[str, str], Mapping[str, Any]]  # (item key, task) -> results row
    tasks: frozenset[str]  # tasks the run attempted (in results or task errors): only these are scored
    duplicate_rows: int  # rows superseded by a later row for the same (item, task)


def _label(location: str) -> str:
    """`gs://b/runs/v2` and `gs://b/runs/v2/results/*.parquet` -> `v2`."""
    path = location.rstrip("/").split("/results/")[0]
    return posixpath.basename(path) or location


def load_run(location: str, match: str = "item_id", label: Optional[str] = None) -> RunResults:
    """All result rows of `location`; for an (item, task) answered twice the newest row wins.

    The errors table only says which tasks the run attempted: a run whose
    every detect answer failed to parse scores 0 on detection, while an
    OCR-only run (a baseline) is not scored on detection at all.
    """
    table = read_parquet(results_files(location), RESULTS_SCHEMA)
    failed_tasks = read_parquet(errors_files(location), ERRORS_SCHEMA).column("task").to_pylist()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    owners: dict[str, str] = {}
    duplicates = 0
    for row in sorted(table.to_pylist(), key=lambda r: r["created_at"]):
        ref = ItemRef.make(row["source_uri"], page=row["page"], member=row["member"])
        key = (claim_key(owners, ref, match), row["task"])
        duplicates += key in rows
        rows[key] = row
    return RunResults(
        location=location,
        label=label or _label(location),
        model_ids=tuple(sorted(set(table.column("model_id").to_pylist()))),
        prompt_versions=tuple(sorted(set(table.column("prompt_version").to_pylist()))),
        run_ids=tuple(sorted(set(table.column("run_id").to_pylist()))),
        rows=rows,
        tasks=frozenset(task for _, task in rows) | {task for task in failed_tasks if task},
        duplicate_rows=duplicates,
    )

