"""The host engine's slots and its accelerator checks, without an engine (fast): which slot a process takes, how
the core's socket finds a reclaiming client, and the one error for an accelerator another process holds.

The engine itself (a killed client's slot reclaimed, with a live client beside it) is in tests/test_host_engine.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from engine.api import EngineSettings
from engine.output import cause_of


def _settings(model_path: str) -> EngineSettings:
    return EngineSettings(model_path=model_path, engine_args={}, max_in_flight=4, structured_output=False, host_feeders=2)


def _dead_process() -> dict:
    from engine import host

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    record = dataclasses.asdict(host.ProcessId.of(process.pid))
    process.wait()
    return record


def _full_generation(tmp_path, monkeypatch, claims: list[dict], greeting: bool = True):
    """A host whose live core (this process stands in for supervisor and core) has every slot claimed as given."""
    from engine import host

    monkeypatch.setenv("VISION_BATCH_HOST_ENGINE_DIR", str(tmp_path))
    settings = _settings(str(tmp_path / "model"))
    directory = host._host_dir(settings.key())
    generation = directory / "g1"
    generation.mkdir()
    (directory / "current").write_text("g1")
    me = dataclasses.asdict(host.ProcessId.of(os.getpid()))
    state = {"generation_dir": str(generation), "supervisor": me, "core": me, "slots": len(claims),
             "inputs": [f"ipc://{generation}/in-{i}" for i in range(len(claims))],
             "outputs": [f"ipc://{generation}/out-{i}" for i in range(len(claims))], "container": host.container_identity()}
    (generation / "core.json").write_text(json.dumps(state))
    for index, claim in enumerate(claims):
        (generation / f"slot-{index}.json").write_text(json.dumps(claim))
    if greeting:
        (generation / "greeting.json").write_text(json.dumps({"identity": "0000", "payload": "80"}))
    return settings, generation


def test_a_process_finding_no_free_slot_takes_over_a_dead_processs(tmp_path, monkeypatch):
    from engine import host

    me = dataclasses.asdict(host.ProcessId.of(os.getpid()))
    dead = _dead_process()
    settings, generation = _full_generation(tmp_path, monkeypatch, [me, {**me, "closed": True}, dead])
    slot = host.acquire_slot(settings, settings.model_path)
    assert (slot.index, slot.reclaimed) == (2, True)  # not the closed slot: its process lives, and may hold its sockets
    assert json.loads((generation / "slot-2.json").read_text())["pid"] == os.getpid()
    assert slot.client_addresses()["input_address"] == f"ipc://{generation}/in-2.{os.getpid()}"  # its own path
    assert slot.client_addresses()["output_address"] == f"ipc://{generation}/out-2"
    assert slot.greeting() == (b"\x00\x00", b"\x80")


def test_without_the_cores_greeting_or_a_dead_process_every_slot_stays_taken(tmp_path, monkeypatch):
    from engine import host

    me = dataclasses.asdict(host.ProcessId.of(os.getpid()))
    settings, _ = _full_generation(tmp_path / "a", monkeypatch, [me, _dead_process()], greeting=False)
    with pytest.raises(host.HostEngineFull):
        host.acquire_slot(settings, settings.model_path)
    settings, _ = _full_generation(tmp_path / "b", monkeypatch, [me, {**me, "closed": True}])
    with pytest.raises(host.HostEngineFull):
        host.acquire_slot(settings, settings.model_path)


def test_the_cores_socket_follows_the_slots_path_to_the_reclaiming_clients_socket(tmp_path):
    """The core's DEALER connects to the slot's path (vLLM: bind=False) and keeps retrying while the dead client's
    socket file refuses it; once the path leads to the new client's socket, the new client can address it."""
    import zmq

    from engine import host

    generation = tmp_path / "g1"
    generation.mkdir()
    me = host.ProcessId.of(os.getpid())
    inputs = f"ipc://{generation}/in-0"
    state = host.CoreState(str(generation), me, me, slots=1, inputs=(inputs,), outputs=(f"ipc://{generation}/out-0",))
    context = zmq.Context()
    try:
        core = context.socket(zmq.DEALER)
        core.setsockopt(zmq.IDENTITY, b"\x00\x00")
        dead = context.socket(zmq.ROUTER)  # the dead client: bound the slot's path, then went away
        dead.bind(inputs)
        core.connect(inputs)
        dead.close(linger=0)
        (generation / "in-0").touch()  # a stale file at the path, as a killed process leaves its socket's
        slot = host.Slot(state, 0, reclaimed=True)
        client = context.socket(zmq.ROUTER)
        client.setsockopt(zmq.ROUTER_MANDATORY, 1)
        client.bind(slot.client_addresses()["input_address"])
        slot.point_core_here()
        assert os.readlink(generation / "in-0") == f"in-0.{os.getpid()}"
        deadline = time.monotonic() + 10
        while True:
            try:
                client.send_multipart([b"\x00\x00", b"request"])
                break
            except zmq.ZMQError as exc:
                assert exc.errno == zmq.EHOSTUNREACH and time.monotonic() < deadline
                time.sleep(0.01)
        assert core.poll(5000) and core.recv() == b"request"
        for socket in (core, client):
            socket.close(linger=0)
    finally:
        context.term()


# What the runtimes say, as their sources write it (engine/output.py cites each).
_BUSY = [
    # openxla/xla xla/stream_executor/tpu/tpu_initialize_util.cc TryAcquireTpuLock, raised through jax
    "RuntimeError: Unable to initialize backend 'tpu': ABORTED: The TPU is already in use by process with pid 2239507. "
    "Not attempting to load libtpu.so in this process.",
    "jaxlib.xla_extension.XlaRuntimeError: ABORTED: The TPU is already in use by another process probably owned by "
    "another user. Run \"$ sudo lsof -w /dev/vfio/0\" to figure out which process is using the TPU. If you still get "
    "this message, run \"$ sudo rm /tmp/libtpu_lockfile\".",
    # libtpu with no shared lock file (marin-community/marin lib/iris/tests/cluster/worker/test_tpu_health.py)
    "jax.errors.JaxRuntimeError: UNKNOWN: TPU initialization failed: open(/dev/vfio/0): Device or resource busy: "
    "Device or resource busy; Couldn't open iommu group /dev/vfio/0",
    # CUDA's cudaErrorDevicesUnavailable, as torch raises it
    "RuntimeError: CUDA error: CUDA-capable device(s) is/are busy or unavailable",
]


@pytest.mark.parametrize("line", _BUSY)
def test_an_accelerator_held_by_another_process_is_one_error_naming_the_cause_and_the_fix(line):
    tail = [
        "(EngineCore pid=812) INFO 12-07 00:00:00 [core.py:99] loading the model",
        "Traceback (most recent call last):",
        '  File "worker.py", line 1, in init_device',
        f"(EngineCore pid=812) {line}",
        "(EngineCore pid=812) ERROR 12-07 00:00:05 [core.py:1200] EngineCore failed to start.",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ]
    cause = cause_of(tail)
    assert cause.startswith("the accelerator is held by another process") and "\n" not in cause
    assert "--host_feeders=1" in cause and "--experiments=no_use_multiple_sdk_containers" in cause


@pytest.mark.parametrize("line", [
    "ValueError: To serve at least one request with the models's max seq len (4096), (1.5 GiB KV cache is needed",
    # vLLM's own check (vllm/v1/worker/utils.py): also a plain over-large utilization, so not taken as "held elsewhere"
    "ValueError: Free memory on device cuda:0 (10.2/22.0 GiB) on startup is less than desired GPU memory utilization "
    "(0.9, 19.8 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.",
    "OSError: [Errno 16] Device or resource busy: '/mnt/weights'",
])
def test_other_start_failures_keep_their_own_cause(line):
    assert cause_of(["Traceback (most recent call last):", line]) == line


def test_the_pre_start_probe_finds_no_held_device_where_none_is_held(tmp_path):
    """The EBUSY branch needs an accelerator held by another container's process: it cannot run here. What can:
    a device file that opens is not held, no device file is nothing held, and a file this process holds open is seen
    (the check that tells this container's holder from another's)."""
    from engine import host

    device = tmp_path / "accel0"
    device.write_text("")
    assert host.accelerators_held_elsewhere((str(tmp_path / "accel[0-9]*"),)) == []
    assert host.accelerators_held_elsewhere((str(tmp_path / "vfio" / "[0-9]*"),)) == []
    with open(device) as handle:
        assert os.getpid() in host.visible_holders(str(device)) and handle
