"""What a run may delete, one run per output, and outputs never read as inputs (issue 26).

Real folders with the user's files under tmp_path, the GCS emulator for gs://,
and the real command line where its exit code and its one line matter.
Every refusal here happens at launch, before the engine starts: only the
tests marked `engine` run the pipeline.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import uuid

import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from configuration.options import UsageError, parse_args
from pipelines import output_lock, output_safety
from tests.conftest import REPO, SAMPLES, run_pipeline
from tests.gcs_emulator import BUCKET
from transforms.sinks import LOCK_FILE, MARKER_FILE, SUMMARY_FIELDS, SUMMARY_FILE, is_run_summary
from transforms.sources import match_pattern

CAPTION = ["--tasks", "caption"]


def cli(*args: str) -> subprocess.CompletedProcess:
    """The real command line in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.vision_batch", "--input", str(SAMPLES / "receipt.png"), *CAPTION, *args],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vision_batch: error: "), done.stderr
    return lines[0]


def options(output: str, *extra: str):
    return parse_args(["--input", str(SAMPLES / "receipt.png"), "--output", output, *extra])


def files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_name(table: str) -> str:
    """A temporary file named as Beam's file sink names them (FileBasedSink: beam-temp-<prefix>-<uuid1 hex>/<uuid4>.<prefix><suffix>)."""
    return f"{table}/beam-temp-part-{uuid.uuid1().hex}/{uuid.uuid4()}.part.parquet"


def write(folder: pathlib.Path, files_: dict[str, object]) -> None:
    for name, content in files_.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))


def our_summary(run_id: str) -> dict:
    """A summary as this pipeline writes it (the fields that identify one)."""
    return {field: {} for field in SUMMARY_FIELDS} | {"run_id": run_id, "finished_at": "2026-11-01T02:00:00+00:00"}


def marker(run_id: str) -> dict:
    return {"tool": "vision_batch", "run_id": run_id, "host": "h", "claimed_at": "2026-11-01T01:00:00+00:00"}


# --- ownership: what a run may delete ----------------------------------------------------------------------

def test_a_users_folder_of_results_and_errors_is_refused_and_kept(tmp_path):
    """The issue's reproduction: `reports/` with results/q3-report.xlsx and errors/notes.txt was emptied."""
    reports = tmp_path / "reports"
    write(reports, {"results/q3-report.xlsx": "Q3", "errors/notes.txt": "notes"})
    before = files(reports)
    for extra in ([], ["--replace_output"]):
        line = one_error_line(cli("--output", str(reports), *extra))
        assert "holds files this pipeline cannot prove it wrote (errors/notes.txt, results/q3-report.xlsx)" in line
        assert "nothing was deleted; choose a new or empty folder" in line
        assert files(reports) == before


def test_another_tools_run_summary_is_not_a_finished_run_of_ours(tmp_path):
    out = tmp_path / "other"
    write(out, {SUMMARY_FILE: {"tool": "other"}, "results/keep.csv": "a,b\n"})
    before = files(out)
    line = one_error_line(cli("--output", str(out), "--replace_output"))
    assert f"cannot prove it wrote (results/keep.csv, {SUMMARY_FILE})" in line and "deleted run" not in line
    assert files(out) == before
    # Our summary's fields without a run id are not ours either.
    assert not is_run_summary({"tool": "other"}) and not is_run_summary(our_summary(""))


def test_an_output_naming_an_existing_file_is_one_line_exit_2(tmp_path):
    existing = tmp_path / "results.csv"
    existing.write_text("keep me")
    line = one_error_line(cli("--output", str(existing)))
    assert line == f"vision_batch: error: --output {existing} is a file, not a folder: name a new or empty folder"
    assert existing.read_text() == "keep me"


def test_an_unfinished_run_of_ours_is_cleared_unless_it_holds_a_users_file(tmp_path):
    out = tmp_path / "out"
    leftovers = {MARKER_FILE: marker("killed"), temp_name("results"): "partial", temp_name("errors"): "partial",
                 "results/part-00000-of-00002.parquet": "published before the kill"}
    write(out, leftovers)
    # A user's file put into it: nothing is deleted, and the refusal names it.
    write(out, {"results/mine.csv": "mine"})
    with pytest.raises(UsageError, match=r"cannot prove it wrote \(results/mine.csv\)"):
        output_safety.check(options(str(out)))
    assert set(files(out)) == {*leftovers, "results/mine.csv"}
    (out / "results" / "mine.csv").unlink()
    # Only the run's own files: cleared, the marker now names the new run, no empty folder left.
    claim = output_safety.claim(options(str(out)), "rerun")
    try:
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, MARKER_FILE]  # Beam's emptied folders pruned too
        assert json.loads((out / MARKER_FILE).read_text())["run_id"] == "rerun"
    finally:
        claim.release()
    assert set(files(out)) == {MARKER_FILE}


def test_files_named_like_ours_prove_nothing_without_a_marker_or_summary(tmp_path):
    out = tmp_path / "beam-job"
    write(out, {"results/part-00000-of-00001.parquet": "another Beam job's"})
    with pytest.raises(UsageError, match=r"cannot prove it wrote \(results/part-00000-of-00001.parquet\)"):
        output_safety.check(options(str(out)))


def test_a_finished_run_of_the_previous_version_is_replaced_only_when_asked(tmp_path):
    """Before markers: a summary with this pipeline's fields proves the run (README, 'Output safety')."""
    out = tmp_path / "old-run"
    write(out, {SUMMARY_FILE: our_summary("old"), "results/part-00000-of-00001.parquet": "r", "errors/part-00000-of-00001.parquet": "e"})
    with pytest.raises(UsageError, match=r"already holds run old \(finished 2026-11-01T02:00:00\+00:00\).*--replace_output"):
        output_safety.check(options(str(out)))
    output_safety.check(options(str(out), "--replace_output"))
    output_safety.claim(options(str(out), "--replace_output"), "new").release()
    assert files(out) == {MARKER_FILE: (out / MARKER_FILE).read_bytes()}
    # A summary beside a marker of another run is not proof: refused, even with --replace_output.
    write(out, {SUMMARY_FILE: our_summary("someone-else")})
    with pytest.raises(UsageError, match=rf"cannot prove it wrote \({SUMMARY_FILE}\)"):
        output_safety.check(options(str(out), "--replace_output"))


def test_a_failed_or_interrupted_run_deletes_only_its_own_files(tmp_path):
    out = tmp_path / "out"
    claim = output_safety.claim(options(str(out)), "this-run")
    ours = [temp_name("results"), "results/part-00000-of-00001.parquet", "errors/part-00000-of-00001.parquet"]
    write(out, {name: "x" for name in ours})
    # Someone drops their files into the output while it runs.
    write(out, {"results/notes.txt": "mine", "README.md": "mine"})
    assert claim.remove_run() == len(ours) + 1  # and the marker
    assert set(files(out)) == {"results/notes.txt", "README.md", LOCK_FILE}
    assert sorted(p.name for p in (out / "results").iterdir()) == ["notes.txt"]  # Beam's emptied folder pruned
    claim.release()
    assert set(files(out)) == {"results/notes.txt", "README.md"}
    # Once the marker names another run (one that took the output over), this run deletes nothing.
    write(out / "second", {MARKER_FILE: marker("other-run"), "results/part-00000-of-00001.parquet": "theirs"})
    stale = output_safety.Claim(str(out / "second"), "this-run", output_lock.acquire(str(out / "second"), "this-run", options(str(out)))[0])
    assert stale.remove_run() == 0 and (out / "second" / "results" / "part-00000-of-00001.parquet").exists()
    stale.release()


# --- one run per output: the lock --------------------------------------------------------------------------

HOLD = """
import sys, time
from apache_beam.options.pipeline_options import PipelineOptions
from pipelines import output_lock
output_lock.acquire(sys.argv[1], sys.argv[2], PipelineOptions([]))
print("held", flush=True)
time.sleep(600)
"""


def hold_in_another_process(output: str, run_id: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, output, run_id], cwd=REPO, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_live_run_is_refused_naming_the_first_and_a_killed_runs_lock_is_free_at_once(tmp_path):
    out = tmp_path / "out"
    first = hold_in_another_process(str(out), "run-A")
    try:
        line = one_error_line(cli("--output", str(out)))
        record = json.loads((out / LOCK_FILE).read_text())
        assert (f"--output {out} is being written by run run-A (started {record['started_at']} on host "
                f"{socket.gethostname()}, pid {first.pid})") in line
        with pytest.raises(output_lock.OutputLocked):
            output_lock.acquire(str(out), "run-B", options(str(out)))
    finally:
        first.kill()
        first.wait()
    # SIGKILL: the kernel drops the flock with the process; the file stays and is taken over at once.
    assert (out / LOCK_FILE).exists()
    started = time.monotonic()
    lock, taken_over = output_lock.acquire(str(out), "run-B", options(str(out)))
    took_s = time.monotonic() - started
    assert taken_over is not None and taken_over.run_id == "run-A" and took_s < 1.0, took_s
    assert json.loads((out / LOCK_FILE).read_text())["run_id"] == "run-B"
    lock.release()
    assert not (out / LOCK_FILE).exists()


def gs_output(name: str) -> str:
    return f"gs://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def put_lock(gcs, output: str, record: output_lock.LockRecord) -> None:
    bucket, _, name = f"{output}/{LOCK_FILE}"[len("gs://"):].partition("/")
    gcs.client().bucket(bucket).blob(name).upload_from_string(record.to_json())


def lock_of(gcs, output: str) -> dict:
    bucket, _, name = f"{output}/{LOCK_FILE}"[len("gs://"):].partition("/")
    return json.loads(gcs.client().bucket(bucket).blob(name).download_as_bytes())


def test_gcs_lock_is_created_once_and_names_its_holder(gcs):
    out = gs_output("locked")
    first, _ = output_lock.acquire(out, "run-A", options(out))
    try:
        with pytest.raises(output_lock.OutputLocked, match=rf"is being written by run run-A \(started .* on host {socket.gethostname()}, pid {os.getpid()}\)"):
            output_lock.acquire(out, "run-B", options(out))
        line = one_error_line(cli("--output", out))  # the command line, before the engine: exit 2, one line
        assert f"--output {out} is being written by run run-A" in line
    finally:
        first.release()
    second, taken_over = output_lock.acquire(out, "run-B", options(out))
    assert taken_over is None and lock_of(gcs, out)["run_id"] == "run-B"
    second.release()
    assert not FileSystems.exists(f"{out}/{LOCK_FILE}")


def test_gcs_stale_rule(gcs):
    now = datetime.datetime.now(datetime.timezone.utc)
    fresh = output_lock.new_record("killed", 120.0)
    ago = lambda s: (now - datetime.timedelta(seconds=s)).isoformat(timespec="seconds")  # noqa: E731
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    cases = [
        # (the record left behind, taken over?)
        (dataclasses.replace(fresh, host="other-host"), False),  # another host's heartbeat is fresh: live
        (dataclasses.replace(fresh, host="other-host", heartbeat_at=ago(fresh.stale_after_s + 5)), True),  # quiet too long
        (dataclasses.replace(fresh, pid=int(dead_pid)), True),  # this host, its process is gone: at once
        (dataclasses.replace(fresh, heartbeat_at=ago(fresh.stale_after_s - 30)), False),  # this host, alive (our pid)
    ]
    for record, stale in cases:
        assert output_lock.is_stale(record, now, socket.gethostname()) is stale, record
        out = gs_output("stale")
        put_lock(gcs, out, record)
        if stale:
            lock, taken_over = output_lock.acquire(out, "next", options(out))
            assert taken_over == record and lock_of(gcs, out)["run_id"] == "next"
            lock.release()
        else:
            with pytest.raises(output_lock.OutputLocked, match=f"run killed .*on host {record.host}"):
                output_lock.acquire(out, "next", options(out))
    # The rule's numbers: quiet for longer than a heartbeat plus one write's whole retry budget plus clock skew.
    assert fresh.stale_after_s == output_lock.HEARTBEAT_S + 120.0 + output_lock.CLOCK_SKEW_S == 210.0


def test_gcs_heartbeat_keeps_the_lock_fresh_and_a_taken_over_holder_deletes_nothing(gcs, monkeypatch):
    monkeypatch.setattr(output_lock, "HEARTBEAT_S", 0.2)
    out = gs_output("beat")
    lock, _ = output_lock.acquire(out, "beating", options(out))
    first = lock_of(gcs, out)["heartbeat_at"]
    time.sleep(1.5)
    assert lock_of(gcs, out)["heartbeat_at"] > first
    # Another run decided it was stale and took it over (generation changed): its lock survives our release.
    put_lock(gcs, out, output_lock.new_record("taker", 120.0))
    time.sleep(0.5)
    lock.release()
    assert lock_of(gcs, out)["run_id"] == "taker"


def test_a_users_gcs_folder_is_refused_and_kept(gcs, tmp_path):
    write(tmp_path / "reports", {"results/q3-report.xlsx": "Q3", "errors/notes.txt": "notes"})
    out = gcs.upload(tmp_path / "reports", gs_output("reports"))
    line = one_error_line(cli("--output", out, "--replace_output"))
    assert "cannot prove it wrote (errors/notes.txt, results/q3-report.xlsx)" in line
    assert sorted(m.path for m in FileSystems.match([f"{out}/**"])[0].metadata_list) == [
        f"{out}/errors/notes.txt", f"{out}/results/q3-report.xlsx"]
    # An object named as --output: one line, as a local file is.
    with pytest.raises(UsageError, match=rf"^--output {out}/results/q3-report.xlsx is an object, not a folder"):
        output_safety.check(options(f"{out}/results/q3-report.xlsx"))


# --- outputs never read as inputs ---------------------------------------------------------------------------

def test_folders_and_globs_skip_folders_holding_this_pipelines_output(tmp_path):
    junk = tmp_path / "junk"
    write(junk, {
        "a.png": "image",
        "out/" + MARKER_FILE: marker("r1"), "out/results/part-00000-of-00001.parquet": "r", "out/" + SUMMARY_FILE: our_summary("r1"),
        "unfinished/" + MARKER_FILE: marker("r2"), "unfinished/" + temp_name("results"): "t",
        "before-markers/" + SUMMARY_FILE: our_summary("r0"), "before-markers/results/part-00000-of-00001.parquet": "r",
        "other-tool/" + SUMMARY_FILE: {"tool": "other"}, "other-tool/b.png": "image",
    })
    kept = [f"{junk}/a.png", f"{junk}/other-tool/b.png", f"{junk}/other-tool/{SUMMARY_FILE}"]
    assert [f.uri for f in match_pattern(str(junk))] == kept
    assert [f.uri for f in match_pattern(f"{junk}/**")] == kept
    assert match_pattern(f"{junk}/**/*.parquet") == [] and match_pattern(f"{junk}/*/results/*.parquet") == []
    # A file named explicitly is read, as always.
    assert [f.uri for f in match_pattern(f"{junk}/out/results/part-00000-of-00001.parquet")] == [
        f"{junk}/out/results/part-00000-of-00001.parquet"]


def test_an_output_inside_an_input_folder_is_a_warning(tmp_path):
    (tmp_path / "junk").mkdir()
    warnings = output_safety.check(parse_args(["--input", str(tmp_path / "junk"), "--output", str(tmp_path / "junk" / "out")]))
    assert warnings == (f"--output {tmp_path}/junk/out is inside --input {tmp_path}/junk: it is not read as input "
                        f"(folders holding this pipeline's {MARKER_FILE} or {SUMMARY_FILE} are skipped)",)


@pytest.mark.engine
def test_an_output_inside_its_input_is_never_read_by_that_run_or_the_next(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "receipt.png").write_bytes((SAMPLES / "receipt.png").read_bytes())
    first = run_pipeline("--input", str(junk), "--output", str(junk / "out"), *CAPTION)
    assert is_run_summary(first) and first["counts"]["files_matched"] == 1
    assert json.loads((junk / "out" / MARKER_FILE).read_text())["run_id"] == first["run_id"]
    assert not (junk / "out" / LOCK_FILE).exists()  # released at the end
    second = run_pipeline("--input", str(junk), "--output", str(tmp_path / "again"), *CAPTION)
    assert second["state"] == "SUCCEEDED" and second["counts"]["files_matched"] == 1 and second["counts"]["error_rows"] == 0
    assert [r["source_uri"] for r in pq.read_table(tmp_path / "again" / "results").to_pylist()] == [str(junk / "receipt.png")]


@pytest.mark.engine
def test_a_second_run_into_a_live_runs_output_is_refused_and_the_first_keeps_its_results(tmp_path, private_model_cache):
    """The issue's case: two runs into one output both reported success, and one's results were gone."""
    from tests.test_interrupts import IMAGES, start, wait_mid_inference
    from tests.test_pipeline_e2e import fresh_images

    fresh_images(tmp_path / "in", IMAGES)
    out = tmp_path / "out"
    first, lines = start(tmp_path, "--input", str(tmp_path / "in"), "--output", str(out))
    wait_mid_inference(first, lines, IMAGES)
    line = one_error_line(cli("--output", str(out)))
    assert first.wait(timeout=600) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert (f"--output {out} is being written by run {summary['run_id']} (started " in line
            and f"on host {socket.gethostname()}, pid {first.pid})" in line)
    assert summary["state"] == "SUCCEEDED" and pq.read_table(out / "results").num_rows == IMAGES
