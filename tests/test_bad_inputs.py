"""Every kind of bad or odd input gives a correct result or a clear error row, from local disk and from gs://."""
from __future__ import annotations

import collections
import pathlib

import pyarrow.parquet as pq
import pytest

from tests import bad_corpus
from tests.conftest import run_pipeline
from tests.gcs_emulator import BUCKET

pytestmark = pytest.mark.engine  # every test here starts the vLLM engine (the fast tier skips them)

ARGS = ("--tasks", "caption", "--max_pages", str(bad_corpus.MAX_PAGES))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    return bad_corpus.build(tmp_path_factory.mktemp("corpus"))


def outcomes(results: list[dict], errors: list[dict], root: str) -> dict[str, tuple[int, list]]:
    """Per corpus file: (items in the results, sorted (stage, error_type) error rows)."""
    items: dict[str, set] = collections.defaultdict(set)
    for row in results:
        items[row["source_uri"]].add(row["item_id"])
    failures: dict[str, list] = collections.defaultdict(list)
    for row in errors:
        failures[row["source_uri"]].append((row["stage"], row["error_type"]))
    return {
        case.path: (len(items.pop(f"{root}/{case.path}", ())), sorted(failures.pop(f"{root}/{case.path}", ())))
        for case in bad_corpus.CASES
    } | {"<unexpected>": (len(items), sorted(failures))}


def check(summary: dict, results: list[dict], errors: list[dict], root: str) -> None:
    got = outcomes(results, errors, root)
    expected = {case.path: (case.ok_items, sorted(case.errors)) for case in bad_corpus.CASES}
    expected["<unexpected>"] = (0, [])
    assert got == expected
    for row in errors:
        assert row["message"] and "object at 0x" not in row["message"], row
    assert summary["accounting"]["balanced"]
    assert summary["accounting"]["items_in"] == sum(c.ok_items + len(c.errors) for c in bad_corpus.CASES)
    by_id = {row["item_id"]: row for row in results}
    rotated = by_id[f"{root}/exif_rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == (100, 300)  # boxes are in this upright frame
    first, second = by_id[f"{root}/dups/first.png"], by_id[f"{root}/dups/second copy.png"]
    assert first["content_hash"] == second["content_hash"]


def test_local_corpus(corpus, tmp_path):
    summary = run_pipeline("--input", f"{corpus}/**", "--output", str(tmp_path / "out"), *ARGS)
    results = pq.read_table(tmp_path / "out" / "results").to_pylist()
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    check(summary, results, errors, str(corpus))


def test_gcs_corpus(corpus, gcs):
    root = gcs.upload(corpus, f"gs://{BUCKET}/corpus")
    output = f"gs://{BUCKET}/corpus-run"
    summary = run_pipeline("--input", f"{root}/**", "--output", output, *ARGS)
    filesystem = gcs.arrow_filesystem()
    results = pq.read_table(f"{BUCKET}/corpus-run/results", filesystem=filesystem).to_pylist()
    errors = pq.read_table(f"{BUCKET}/corpus-run/errors", filesystem=filesystem).to_pylist()
    check(summary, results, errors, root)
