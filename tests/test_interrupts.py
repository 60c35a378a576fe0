"""Runs that are interrupted or killed midway, as real processes on the real engine.

- Ctrl-C / SIGTERM: exit 130 / 143, one line saying what was kept, no
  traceback, nothing of the run's left in --output (a user's file there
  stays) or the temp dir.
- SIGKILL (issue 15, "Runs that get killed"): no final file that looks
  complete; the same command, with --incremental_from as a nightly job runs
  it, then completes with exactly the expected rows.
"""
from __future__ import annotations

import collections
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, SMALL_OUTPUTS, run_pipeline
from tests.test_pipeline_e2e import fresh_images
from transforms.sinks import LOCK_FILE, MARKER_FILE

pytestmark = pytest.mark.engine  # every test here starts the vLLM engine (the fast tier skips them)

IMAGES = 60
CAPTION = ["--tasks", "caption"]
# One request at a time, longer answers: the tiny model otherwise answers all 60 captions
# within one progress interval, and the signal must come while it is still inferring. No
# re-asks: the random model's captions all run to max_tokens, and climbing the text ladder
# (two more requests each, one at a time) only made these runs 3x longer to wait for.
SLOW = ["--max_in_flight", "1", "--max_tokens", "caption=32", "--max_retries", "0"]
_DONE = re.compile(r"progress: .* (\d+) tasks done")


def start(tmp_path: pathlib.Path, *args: str) -> tuple[subprocess.Popen, "queue.Queue[str]"]:
    """The command line in its own process, with a private temp dir; stderr lines arrive on the queue."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    # Without the VLLM_* variables the session's own engine set in this process (a fresh shell has none).
    env = {key: value for key, value in os.environ.items() if not key.startswith("VLLM_")}
    env.update(PYTHONPATH=str(REPO), TMPDIR=str(tmp_path / "tmp"))
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.vision_batch", *args, *CAPTION, *SMALL_OUTPUTS, *SLOW, "--progress_interval_s", "1"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    return process, lines


def wait_mid_inference(process: subprocess.Popen, lines: "queue.Queue[str]", total: int) -> list[str]:
    """Stderr up to the first progress line showing some, not all, tasks done."""
    seen, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert process.poll() is None, "".join(seen)
            continue
        seen.append(line)
        done = _DONE.search(line)
        if done and 0 < int(done.group(1)) < total:
            return seen
    raise AssertionError("no progress line mid-inference:\n" + "".join(seen))


def drain(lines: "queue.Queue[str]") -> list[str]:
    rest = []
    while True:
        try:
            rest.append(lines.get(timeout=1))
        except queue.Empty:
            return rest


def files_under(path: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_exits_with_the_signals_code_and_leaves_nothing(tmp_path, private_model_cache, signum, code):
    fresh_images(tmp_path / "in", IMAGES)
    out = tmp_path / "out"
    process, lines = start(tmp_path, "--input", str(tmp_path / "in"), "--output", str(out))
    before = wait_mid_inference(process, lines, IMAGES)
    # Someone saves a file into the output while the run is going: the cleanup is not theirs to suffer.
    (out / "results").mkdir(exist_ok=True)
    (out / "results" / "notes.txt").write_text("mine")
    process.send_signal(signum)
    assert process.wait(timeout=120) == code
    after = drain(lines)
    stderr = "".join(before + after)
    assert "Traceback" not in stderr and not any("progress:" in line for line in after)
    [last] = [line for line in after if line.strip()]
    assert last.startswith(f"vision_batch: interrupted by {signal.Signals(signum).name} after ")
    assert "stopped the engine" in last and "Nothing of this run is kept" in last
    assert files_under(out) == [out / "results" / "notes.txt"]  # the run's own files, marker and lock gone
    assert list((tmp_path / "tmp").iterdir()) == []  # Beam's pipeline folder, vLLM's rendezvous file: gone
    # The default log: this pipeline's own lines only (vLLM's start-up warnings, torch's notices, progress bars
    # all filtered), the first progress line within seconds of the engine being up.
    ours = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING) (run |starting the vLLM engine|vLLM engine for .* ready"
                      r"|progress: |The model is the project's tiny RANDOM|built tiny-\S+ checkpoint )")
    assert [line for line in before + after[:-1] if line.strip() and not ours.match(line)] == []


def test_a_killed_nightly_run_leaves_nothing_complete_and_its_rerun_writes_exactly_the_rest(tmp_path, private_model_cache):
    fresh_images(tmp_path / "in", IMAGES)
    nightly = tmp_path / "nightly"
    first = run_pipeline("--input", str(tmp_path / "in"), "--output", str(nightly / "d1"), *CAPTION, "--limit", "10")
    assert first["state"] == "SUCCEEDED" and first["counts"]["result_rows"] == 10
    tonight = ["--input", str(tmp_path / "in"), "--output", str(nightly / "d2"), "--incremental_from", f"{nightly}/*"]

    process, lines = start(tmp_path, *tonight)
    wait_mid_inference(process, lines, IMAGES - 10)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    left = files_under(nightly / "d2")
    # Nothing that looks complete: no summary, no final table files; only Beam's temporaries, the marker the
    # run wrote first (it makes the folder provably this pipeline's) and its lock file (the kernel freed the lock).
    assert not (nightly / "d2" / "run_summary.json").exists()
    assert sorted(p.name for p in left if "beam-temp-" not in str(p)) == sorted([MARKER_FILE, LOCK_FILE])

    # The same command again: leftovers cleared, the earlier night skipped, exactly the rest written once.
    rerun = run_pipeline(*tonight, *CAPTION)
    assert rerun["state"] == "SUCCEEDED" and rerun["counts"]["skipped_items"] == 10
    results = pq.read_table(nightly / "d2" / "results").to_pylist()
    keys = collections.Counter((row["item_id"], row["task"]) for row in results)
    assert len(keys) == IMAGES - 10 and set(keys.values()) == {1}
    assert not any("beam-temp-" in str(p) for p in files_under(nightly / "d2"))
    assert all(p.name.startswith("part-") or p.name in ("run_summary.json", MARKER_FILE) for p in files_under(nightly / "d2"))
