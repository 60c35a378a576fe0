"""The command line a scheduler and a newcomer rely on, on the real engine and runner.

Exit codes come from `main` called in this process (it returns what the
process exits with), sharing the session's engine; tests/test_interrupts.py
covers what only a real process shows (signals, SIGKILL).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configuration.options import UsageError
from pipelines import output_safety, vision_batch
from tests.conftest import REPO, SAMPLES, SMALL_OUTPUTS, copy_samples, run_pipeline

CAPTION = ["--tasks", "caption"]


@pytest.fixture
def cli():
    """Call `main` as the command line does, leaving this process's logging, signals and environment as they were."""

    def main(*args: str) -> int:
        with vision_batch.restoring_process_state():
            return vision_batch.main([*args, *SMALL_OUTPUTS])

    return main


def summary_of(out: pathlib.Path) -> dict:
    return json.loads((out / "run_summary.json").read_text())


def rows(out: pathlib.Path, table: str = "results") -> list[dict]:
    return pq.read_table(out / table).to_pylist() if (out / table).exists() else []


# --- exit codes and the summary's state ------------------------------------------------------------------

@pytest.mark.engine
def test_exit_codes_and_state_per_outcome(cli, tmp_path, capsys):
    good = tmp_path / "good"
    copy_samples(good)
    bad = tmp_path / "mixed"
    bad.mkdir()
    shutil.copy(SAMPLES / "receipt.png", bad / "receipt.png")
    (bad / "empty.png").write_bytes(b"")

    # 0: finished within the budget.
    assert cli("--input", str(good / "receipt.png"), "--output", str(tmp_path / "ok"), *CAPTION) == 0
    ok = summary_of(tmp_path / "ok")
    assert ok["state"] == "SUCCEEDED" and "0 of 1 task outcomes failed" in ok["state_reason"]
    assert f"run {ok['run_id']} SUCCEEDED" in capsys.readouterr().out

    # 1: one of two items failed before the engine: 50% of outcomes, over the default 5%.
    assert cli("--input", str(bad), "--output", str(tmp_path / "over"), *CAPTION) == 1
    over = summary_of(tmp_path / "over")
    assert over["state"] == "FAILED" and over["state_reason"].startswith("error budget exceeded: 1 of 2 task outcomes")
    assert over["error_budget"] == {"max_error_fraction": 0.05, "error_fraction": 0.5, "failed_task_outcomes": 1, "task_outcomes": 2,
                                     "flagged_results_counted": 0}
    assert "FAILED: error budget exceeded" in capsys.readouterr().out
    from pipelines import report  # the run report says so too

    assert report.main([str(tmp_path / "over"), "--html", str(tmp_path / "over.html")]) == 0
    assert "<b>Run failed:</b> error budget exceeded: 1 of 2 task outcomes" in (tmp_path / "over.html").read_text()
    # ... and within a budget that allows it.
    assert cli("--input", str(bad), "--output", str(tmp_path / "within"), *CAPTION, "--max_error_fraction", "0.5") == 0

    # 1: nothing processed (every input matched nothing).
    assert cli("--input", str(tmp_path / "nowhere" / "*.png"), "--output", str(tmp_path / "none"), *CAPTION) == 1
    assert summary_of(tmp_path / "none")["state_reason"].startswith("nothing was processed")

    # 2: usage errors, one line, nothing started, no output written.
    capsys.readouterr()
    assert cli("--input", str(good), "--output", str(tmp_path / "usage"), "--max_token", "caption=4") == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["vision_batch: error: unknown option --max_token; did you mean --max_tokens? (see --help)"]
    assert not (tmp_path / "usage").exists()
    assert cli("--input", str(good), "--output", str(tmp_path / "usage"), "--model", str(tmp_path / "no-model")) == 2
    assert "not a Hugging Face checkpoint directory" in capsys.readouterr().err


def test_usage_errors_exit_2_without_a_traceback_from_the_real_command():
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.vision_batch", "--input", "data/samples/*.png", "data/samples/chart.webp",
         "--output", "out/never"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("vision_batch: error: unexpected arguments 'data/samples/chart.webp' after --input")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.engine
def test_a_job_nobody_waits_for_fails_in_its_last_step(tmp_path):
    """Dataflow's case, on a runner this process does not report for: the summary step fails the job."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    with pytest.raises(Exception, match="FAILED: nothing was processed"):
        run_pipeline("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *CAPTION,
                     "--runner", "BundleBasedDirectRunner")
    assert summary_of(tmp_path / "out")["state"] == "FAILED"  # written before the step failed


# --- output safety --------------------------------------------------------------------------------------

@pytest.mark.engine
def test_a_rerun_into_the_same_folder_keeps_the_first_runs_rows(tmp_path):
    out = tmp_path / "out"
    first = run_pipeline("--input", str(SAMPLES / "receipt.png"), "--output", str(out), *CAPTION)
    kept = rows(out)
    # The data loss: the same folder as output and as history. Refused, with the fix.
    with pytest.raises(UsageError, match=r"is also an --incremental_from location.*--output .*/NEW_RUN --incremental_from"):
        run_pipeline("--input", str(SAMPLES / "receipt.png"), "--output", str(out), "--incremental_from", f"{out}/", *CAPTION)
    # Plainly the same folder again: refused too.
    with pytest.raises(UsageError, match=rf"already holds run {first['run_id']} .*--replace_output"):
        run_pipeline("--input", str(SAMPLES / "receipt.png"), "--output", str(out), *CAPTION)
    assert rows(out) == kept and summary_of(out)["run_id"] == first["run_id"]
    # Asked for: replaced, and nothing of the first run is left.
    second = run_pipeline("--input", str(SAMPLES / "chart.webp"), "--output", str(out), *CAPTION, "--replace_output")
    assert second["run_id"] != first["run_id"]
    assert [r["source_uri"] for r in rows(out)] == [str(SAMPLES / "chart.webp")]


@pytest.mark.engine
def test_an_output_with_files_the_pipeline_did_not_write_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for extra in ([], ["--replace_output"]):
        with pytest.raises(UsageError, match=r"holds files this pipeline cannot prove it wrote \(notes.txt\)"):
            run_pipeline("--input", str(SAMPLES / "receipt.png"), "--output", str(tmp_path), *CAPTION, *extra)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.engine
def test_nightly_pattern_skips_earlier_nights_and_never_reads_its_own_output(tmp_path):
    nightly = tmp_path / "nightly"
    first = run_pipeline("--input", str(SAMPLES), "--output", str(nightly / "d1"), *CAPTION, "--limit", "3",
                         "--incremental_from", f"{nightly}/*")
    assert first["warnings"][0].startswith(f"--incremental_from {nightly}/* holds no complete earlier run")
    # A killed second night left its marker (written first), a partial results file (as if it died while
    # publishing) and Beam's temporaries, named as Beam names them.
    d2 = nightly / "d2"
    temp = d2 / "results" / f"beam-temp-part-{uuid.uuid1().hex}"
    temp.mkdir(parents=True)
    (temp / f"{uuid.uuid4()}.part.parquet").write_bytes(b"partial")
    shutil.copy(next((nightly / "d1" / "results").glob("*.parquet")), d2 / "results" / "part-00000-of-00001.parquet")
    output_safety.write_marker(str(d2), "killed-night")
    # A night without a summary is not history, for a later night either.
    later = run_pipeline("--input", str(SAMPLES), "--output", str(nightly / "d3"), *CAPTION, "--limit", "3",
                         "--incremental_from", f"{nightly}/*")
    assert later["counts"]["skipped_items"] == 3
    assert any("d2 holds an unfinished run" in w for w in later["warnings"])
    # Rerunning the killed night's command: leftovers cleared, earlier complete nights skipped, exactly the rest done.
    rerun = run_pipeline("--input", str(SAMPLES), "--output", str(d2), *CAPTION, "--incremental_from", f"{nightly}/*")
    assert rerun["state"] == "SUCCEEDED" and rerun["counts"]["skipped_items"] == 3
    assert len(rows(d2)) == 8 - 3 and not list((d2 / "results").glob("beam-temp-*"))


@pytest.mark.engine
def test_results_written_with_as_typed_ids_still_count_as_history(tmp_path):
    """Result files from before ids were canonical carry the path as typed: incremental runs key on content, not ids."""
    old = tmp_path / "old"
    run_pipeline("--input", str(SAMPLES / "receipt.png"), "--output", str(old), *CAPTION)
    [part] = (old / "results").glob("*.parquet")
    table = pq.read_table(part)
    for column in ("item_id", "source_uri"):  # as an older version wrote `--input data/samples/receipt.png`
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(["data/samples/receipt.png"]))
    pq.write_table(table, part)
    new = run_pipeline("--input", str(SAMPLES / "receipt.png"), "--output", str(tmp_path / "new"), *CAPTION,
                       "--incremental_from", str(old))
    assert new["counts"]["skipped_items"] == 1 and new["counts"]["result_rows"] == 0
    assert new["state"] == "SUCCEEDED" and new["state_reason"] == "all 1 items were answered by earlier runs (--incremental_from)"


# --- inputs as people give them -------------------------------------------------------------------------

@pytest.mark.engine
def test_a_folder_means_its_files_minus_hidden_and_excluded(tmp_path):
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    (folder / ".git").mkdir()
    shutil.copy(SAMPLES / "receipt.png", folder / "a.png")
    shutil.copy(SAMPLES / "chart.webp", folder / "sub" / "b.webp")
    shutil.copy(SAMPLES / "receipt.png", folder / ".git" / "c.png")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "notes.txt").write_text("not an image")
    summary = run_pipeline("--input", str(folder), "--exclude", "*.txt", "--output", str(tmp_path / "out"), *CAPTION)
    assert sorted(r["item_id"] for r in rows(tmp_path / "out")) == [f"{folder}/a.png", f"{folder}/sub/b.webp"]
    assert summary["counts"]["error_rows"] == 0 and summary["state"] == "SUCCEEDED"
    # The same folder as a ** glob, hidden files asked for, only some names included.
    run_pipeline("--input", f"{folder}/**", "--include_hidden", "--include", "*.png", "--output", str(tmp_path / "out2"), *CAPTION)
    assert sorted(r["item_id"] for r in rows(tmp_path / "out2")) == [f"{folder}/.git/c.png", f"{folder}/a.png"]


@pytest.mark.engine
def test_limit_takes_the_first_items_in_input_order(tmp_path):
    # data/samples: chart.webp, fax.tiff (2 pages), receipt.png, report.pdf (3 pages), shapes_rotated.jpg
    summary = run_pipeline("--input", str(SAMPLES), "--output", str(tmp_path / "out"), *CAPTION, "--limit", "4")
    ids = sorted(r["item_id"] for r in rows(tmp_path / "out"))
    assert ids == [f"{SAMPLES}/chart.webp", f"{SAMPLES}/fax.tiff#page=0", f"{SAMPLES}/fax.tiff#page=1", f"{SAMPLES}/receipt.png"]
    assert summary["counts"]["items"] == 4 and summary["accounting"]["balanced"]
    # Cut inside a multi-page document.
    run_pipeline("--input", str(SAMPLES / "report.pdf"), "--output", str(tmp_path / "pdf"), *CAPTION, "--limit", "2")
    assert sorted(r["page"] for r in rows(tmp_path / "pdf")) == [0, 1]


# --- stable ids and redaction ---------------------------------------------------------------------------

@pytest.mark.engine
def test_ids_are_the_same_from_relative_and_dotdot_paths_and_manifests(tmp_path, monkeypatch):
    data = tmp_path / "data"
    copy_samples(data)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "m.txt").write_text("../data/./receipt.png\n")
    elsewhere = tmp_path / "work" / "deep"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    run_pipeline("--input", "../../data//chart.webp", "--manifest", "../../lists/m.txt", "--output", "out", *CAPTION)
    got = sorted((r["item_id"], r["source_uri"]) for r in rows(elsewhere / "out"))
    assert got == [(f"{data}/chart.webp",) * 2, (f"{data}/receipt.png",) * 2]


@pytest.mark.engine
def test_a_password_in_a_uri_is_never_written(cli, tmp_path, capsys):
    secret = "hunter2-s3cr3t"
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"s3://AKIAEXAMPLE:{secret}@my-bucket/a.png\n")
    out = tmp_path / "out"
    code = cli("--input", str(SAMPLES / "receipt.png"), "--input", f"hdfs://analyst:{secret}@namenode/scans/*.png",
               "--manifest", str(manifest), "--output", str(out), *CAPTION, "--max_error_fraction", "1",
               "--log_level", "INFO")
    assert code == 0
    printed = capsys.readouterr()
    errors = rows(out, "errors")
    assert {e["error_type"] for e in errors} and len(errors) == 2
    assert {e["item_id"] for e in errors} == {"hdfs://namenode/scans/*.png", "s3://my-bucket/a.png"}
    written = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    subprocess.run([sys.executable, "-m", "pipelines.report", str(out), "--html", str(tmp_path / "r.html")],
                   check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=300)
    for text in [*written, (tmp_path / "r.html").read_bytes(), printed.out.encode(), printed.err.encode()]:
        assert secret.encode() not in text
    assert b"***" in (out / "run_summary.json").read_bytes()
    assert " apache_beam." in printed.err  # --log_level INFO: every library's lines, with their logger names
