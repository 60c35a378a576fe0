"""The engine on real workers (issue 20): a failed start names its cause in the log, the core is spawned and its
start bounded, the compile cache persists, feeders that do not share a container stop, the owner closes engines.

The fast tests drive the parts without an engine (the output follower, the cache against the GCS emulator, the
host's directory, the registry); the `engine` tests start vLLM's real engine core in its own process.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from engine.api import EngineSettings


def _settings(model_path: str, **fields) -> EngineSettings:
    return EngineSettings(model_path=model_path, engine_args={}, max_in_flight=4, structured_output=False, **fields)


# ---------------------------------------------------------------- 1. the engine's output in the log


def test_a_child_processes_output_is_logged_line_by_line_and_a_traceback_names_the_cause(tmp_path, caplog):
    """What a Dataflow worker's log needs: the engine core's stderr (here a child that dies with a traceback, as
    vLLM's core does) reaches Python logging with its level, and the failure's cause is one line."""
    from engine.output import CapturedStreams, EngineOutput

    output = EngineOutput(tmp_path / "core.log", "engine core")
    child = textwrap.dedent("""
        import logging, sys
        print("INFO 12-06 20:00:00 [core.py:1] loading the model", flush=True)
        print("WARNING 12-06 20:00:01 [core.py:2] something odd", file=sys.stderr, flush=True)
        raise ValueError("To serve at least one request ... KV cache is needed, which is larger than the available KV cache memory")
    """)
    caplog.set_level(logging.INFO, logger="engine.output")
    captured = CapturedStreams(output.path)  # the child inherits the file as its streams, as vLLM's core does
    try:
        process = subprocess.Popen([sys.executable, "-c", child])
    finally:
        captured.restore()
    assert process.wait(60) == 1
    cause = output.cause()
    output.close()
    assert cause == ("ValueError: To serve at least one request ... KV cache is needed, which is larger than the "
                     "available KV cache memory")
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "engine.output"]
    assert (logging.INFO, "[engine core] INFO 12-06 20:00:00 [core.py:1] loading the model") in records
    assert any(level == logging.WARNING and "something odd" in text for level, text in records)
    assert any(level == logging.ERROR and text.endswith(cause) for level, text in records)  # the traceback: ERROR
    assert any(level == logging.ERROR and "Traceback" in text for level, text in records)


def test_vllms_own_logger_joins_the_logging_tree():
    """vLLM gives its logger a stdout handler and propagate=False (vllm/logger.py): on a worker its lines would wait
    in boot.go's buffer until the process exits."""
    from engine.output import route_vllm_logging

    vllm_logger = logging.getLogger("vllm")
    handler = logging.StreamHandler(sys.stdout)
    vllm_logger.addHandler(handler)
    vllm_logger.propagate = False
    route_vllm_logging()
    assert vllm_logger.propagate and handler not in vllm_logger.handlers


@pytest.mark.engine
def test_a_failed_engine_core_start_raises_one_line_and_logs_the_cause(tiny_checkpoint, caplog):
    """The real engine, its core in its own process (the accelerator placement): a KV pool too small for one
    sequence fails inside the core. The cause reaches Python logging, and the one exception says it."""
    from engine.api import EngineStartFailed
    from engine.registry import build_engine
    from tests.test_engine_isolation import _tiny_settings

    settings = dataclasses.replace(_tiny_settings(tiny_checkpoint, max_model_len=256), engine_core_process=True)
    settings = dataclasses.replace(settings, engine_args={**settings.engine_args, "kv_cache_memory_bytes": 4096})
    caplog.set_level(logging.INFO)
    with pytest.raises(EngineStartFailed) as failure:
        build_engine(settings)
    message = str(failure.value)
    assert "\n" not in message and "failed to start: ValueError:" in message and "cache blocks" in message, message
    cause = message.split("failed to start: ", 1)[1]
    core_lines = [r for r in caplog.records if r.name == "engine.output"]
    assert any(r.levelno == logging.ERROR and r.getMessage().endswith(cause) for r in core_lines), cause
    assert any(r.levelno == logging.ERROR and r.name == "engine.local" and cause in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- 2. spawn, and a bounded start


def test_the_engine_core_is_spawned_not_forked(monkeypatch):
    """vLLM forks its core unless CUDA/XPU/Ray forces spawn (vllm/utils/system_utils.py); beside Beam's threads
    a fork can inherit a held lock forever."""
    from engine.process import prepare_process

    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    prepare_process(_settings("unused"))
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"


@pytest.mark.engine
def test_a_start_longer_than_its_timeout_fails_with_one_clear_error_not_a_hang(tiny_checkpoint):
    """A 2-second budget cannot hold a spawned core's start (its imports alone take longer): the start ends in
    EngineStartTimeout naming what it waited for, and the half-started core is ended, not left on the device."""
    import multiprocessing

    from engine.api import EngineStartTimeout
    from engine.registry import build_engine
    from tests.test_engine_isolation import _tiny_settings

    settings = dataclasses.replace(
        _tiny_settings(tiny_checkpoint, max_model_len=256), engine_core_process=True, start_timeout_s=2.0
    )
    before = set(multiprocessing.active_children())
    outcome: list[BaseException] = []

    def start() -> None:
        try:
            build_engine(settings)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the engine start hung past its timeout"
    [error] = outcome
    assert isinstance(error, EngineStartTimeout), error
    assert "did not become ready within 2 s" in str(error) and "engine core process" in str(error)
    assert "\n" not in str(error) and time.monotonic() - started < 60
    # The core it started is ended (or, started only after the timeout, shut down once ready: nobody owns it).
    deadline = time.monotonic() + 120
    while set(multiprocessing.active_children()) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(multiprocessing.active_children()) - before


# ---------------------------------------------------------------- 3. the compile cache


def test_the_compile_cache_round_trips_through_gcs(gcs, tmp_path, monkeypatch, caplog):
    """jax never sees gs:// (it would write a local folder named `gs:`): the engine compiles into a local copy,
    which is saved after the start and restored on the next worker, here through the GCS emulator."""
    from engine.compile_cache import CompileCache
    from tests.gcs_emulator import BUCKET

    uri = f"gs://{BUCKET}/xla-cache/image-1/profile-abc"
    first = CompileCache(uri, required=True, root=tmp_path / "worker-1")
    first.before_start()
    assert os.environ["VLLM_XLA_CACHE_PATH"] == str(first.directory) and not str(first.directory).startswith("gs:")
    (first.directory / "jit_step-0a1b-cache").write_bytes(b"\x00compiled" * 1000)  # what jax writes while compiling
    (first.directory / "jit_step-0a1b-atime").write_bytes(b"1")
    caplog.set_level(logging.INFO, logger="engine.compile_cache")
    first.after_start()
    saved = [r.getMessage() for r in caplog.records if "saved to" in r.getMessage()]
    assert saved == [f"XLA compile cache: 2 new file(s) saved to {uri} after the engine started; verified by listing: "
                     "all 2 local file(s) are there at their size (2 file(s), 0.0 MB in the cache)"], saved

    second = CompileCache(uri, required=True, root=tmp_path / "worker-2")
    second.before_start()
    assert sorted(p.name for p in second.directory.iterdir()) == ["jit_step-0a1b-atime", "jit_step-0a1b-cache"]
    assert (second.directory / "jit_step-0a1b-cache").read_bytes() == b"\x00compiled" * 1000
    (second.directory / "jit_prefill-9f-cache").write_bytes(b"more")  # a shape first met while running
    second.after_close()
    names = sorted(blob.name for blob in gcs.client().bucket(BUCKET).list_blobs(prefix="xla-cache/image-1/"))
    assert names == [f"xla-cache/image-1/profile-abc/{name}" for name in
                     ("jit_prefill-9f-cache", "jit_step-0a1b-atime", "jit_step-0a1b-cache")]


def test_a_warm_up_that_compiled_nothing_fails_loudly(gcs, tmp_path):
    from engine.compile_cache import CompileCache, CompileCacheEmpty
    from tests.gcs_emulator import BUCKET

    cache = CompileCache(f"gs://{BUCKET}/xla-cache/empty", required=True, root=tmp_path)
    cache.before_start()
    with pytest.raises(CompileCacheEmpty, match="holds no compiled program"):
        cache.after_start()
    CompileCache(f"gs://{BUCKET}/xla-cache/empty", required=False, root=tmp_path).after_start()  # a job: a warning


@pytest.fixture
def cache_read_only(gcs, monkeypatch):
    """The worker's storage as GCS answers a service account that may read the cache's bucket but not write it
    (roles/storage.objectViewer): every upload under xla-cache/ is refused 403."""
    from tests.fault_proxy import FaultProxy, Rule

    rules = [Rule(op, "403", object_contains="/xla-cache/") for op in ("write", "write-start")]
    with FaultProxy(("127.0.0.1", gcs.port), rules) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        yield proxy
        # An upload that failed leaves google-cloud-storage's BlobWriter unclosed, and its finalizer tries the
        # upload again when it is collected: while the proxy still answers (403 again, at once), not in a later
        # test against its closed port (connection refused, retried for the whole GCS retry budget, 120 s).
        gc.collect()


@pytest.mark.engine  # it constructs VisionEngine, which the fast tier refuses (tests/conftest.py); vLLM never starts
def test_a_warm_up_whose_cache_it_cannot_write_fails_before_any_engine_is_built(cache_read_only, tmp_path, monkeypatch):
    """A warm-up whose workers cannot write the cache fails at once, in one line naming the bucket and the fix,
    instead of after its ~30-minute compile (and again after each of Dataflow's retries): no engine is built."""
    from engine.compile_cache import CompileCacheUnusable
    from engine.local import VisionEngine
    from tests.gcs_emulator import BUCKET

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the local cache copy lands here
    connects: list[EngineSettings] = []

    def connect(settings, local_model):  # noqa: ANN001, ANN202 - what building the vLLM engine (the compile) would be
        connects.append(settings)
        raise AssertionError("the engine was built")

    (tmp_path / "model").mkdir()
    settings = _settings(str(tmp_path / "model"), xla_cache_path=f"gs://{BUCKET}/xla-cache/image-1/profile-abc",
                         xla_cache_required=True)
    with pytest.raises(CompileCacheUnusable) as failure:
        VisionEngine(settings, connect)
    message = str(failure.value)
    assert "\n" not in message, message
    assert f"the write of a probe object in bucket {BUCKET} failed" in message and "403" in message, message
    assert "(Forbidden (injected by the test's fault proxy))" in message, message  # GCS's own words, from its body
    assert "roles/storage.objectAdmin" in message and f"gs://{BUCKET} --member=" in message, message
    assert connects == []
    assert [(i.fault, i.op) for i in cache_read_only.injected] == [("403", "write-start")]  # refused, not merely absent


def test_an_unusable_cache_is_the_first_thing_a_warm_up_engine_start_meets(cache_read_only, gcs, tmp_path, monkeypatch):
    """The fast tier's half of the test above: the cache VisionEngine opens first refuses a location it cannot
    write (a read-only bucket, or one that does not exist), before it downloads anything."""
    from engine.compile_cache import CompileCacheUnusable, open_cache
    from tests.gcs_emulator import BUCKET

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for uri in (f"gs://{BUCKET}/xla-cache/read-only", "gs://vision-batch-no-such-bucket/xla-cache"):
        settings = _settings("unused", xla_cache_path=uri, xla_cache_required=True)
        with pytest.raises(CompileCacheUnusable, match="the write of a probe object in bucket "):
            open_cache(settings)
    assert not (tmp_path / "vision-batch-xla-cache").exists()  # nothing was downloaded or created


def test_a_job_whose_cache_bucket_it_cannot_write_warns_and_goes_on(gcs, tmp_path, caplog):
    """Only the warm-up requires the cache: a job's worker logs the same line as a WARNING, and compiles."""
    from engine.compile_cache import CompileCache
    from tests.gcs_emulator import BUCKET

    # A bucket that exists but whose cache prefix the worker may not write cannot be made on the emulator (it
    # has no IAM); a missing bucket fails the same first step.
    cache = CompileCache("gs://vision-batch-no-such-bucket/xla-cache", required=False, root=tmp_path)
    caplog.set_level(logging.INFO, logger="engine.compile_cache")
    cache.check_usable()
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "vision-batch-no-such-bucket" in warning.getMessage() and "goes on" in warning.getMessage()

    caplog.clear()
    CompileCache(f"gs://{BUCKET}/xla-cache/usable", required=True, root=tmp_path).check_usable()
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert not list(gcs.client().bucket(BUCKET).list_blobs(prefix="xla-cache/usable/"))  # the probe is deleted


def test_a_probe_left_behind_is_never_a_compiled_program(gcs, tmp_path):
    """A worker that may write but not delete leaves its probe: it must not pass the warm-up's emptiness check."""
    from engine.compile_cache import PROBE_PREFIX, CompileCache, CompileCacheEmpty
    from tests.gcs_emulator import BUCKET

    leftover = tmp_path / "probe"
    leftover.write_bytes(b"probe")
    gcs.upload(leftover, f"gs://{BUCKET}/xla-cache/leftover/{PROBE_PREFIX}worker-1-42")
    cache = CompileCache(f"gs://{BUCKET}/xla-cache/leftover", required=True, root=tmp_path)
    cache.before_start()
    assert not any(cache.directory.iterdir())
    with pytest.raises(CompileCacheEmpty):
        cache.after_start()


def test_the_warm_up_job_requires_its_cache_to_fill():
    from configuration.options import parse_command_line, plan_engine, validate
    from launch import warmup

    request = validate(parse_command_line(["--input=x", "--output=y", *warmup.PIPELINE_ARGS]), local_paths=False)
    assert plan_engine(request).settings("m").xla_cache_required


# ---------------------------------------------------------------- 4. feeders sharing one engine core


def test_feeders_that_do_not_share_a_container_stop_naming_the_fix(tmp_path, monkeypatch):
    """A core recorded by a supervisor of another container (other PID and mount namespaces) cannot be checked from
    here, and a second core would open the same accelerator: the start stops, naming --host_feeders=1."""
    from engine import host

    monkeypatch.setenv("VISION_BATCH_HOST_ENGINE_DIR", str(tmp_path))
    settings = _settings(str(tmp_path / "model"), host_feeders=2)
    directory = host._host_dir(settings.key())
    generation = directory / "g1"
    generation.mkdir()
    (directory / "current").write_text("g1")
    me = dataclasses.asdict(host.ProcessId.of(os.getpid()))
    state = {"generation_dir": str(generation), "supervisor": me, "core": me, "slots": 6, "inputs": [], "outputs": [],
             "container": "pid:1,mnt:1"}
    (generation / "core.json").write_text(json.dumps(state))
    with pytest.raises(host.HostEngineNotShared, match=r"do not share one container.*--host_feeders=1"):
        host.acquire_slot(settings, str(tmp_path / "model"))
    assert host.container_identity() != "pid:1,mnt:1"


def test_each_feeders_share_of_the_in_flight_limit_follows_the_clients_attached(tmp_path):
    """--host_feeders 4 planned, one process attached: it admits the host's whole limit, not a quarter; a dead
    client's share returns to the others."""
    from engine import host

    generation = tmp_path / "g1"
    generation.mkdir()
    me = host.ProcessId.of(os.getpid())
    state = host.CoreState(str(generation), me, me, slots=8, inputs=(), outputs=())
    (generation / "slot-0.json").write_text(json.dumps(dataclasses.asdict(me)))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_id = host.ProcessId.of(dead.pid)
    dead.wait()
    (generation / "slot-1.json").write_text(json.dumps(dataclasses.asdict(dead_id)))
    (generation / "slot-2.json").write_text(json.dumps({**dataclasses.asdict(me), "closed": True}))
    assert host.live_clients(state) == 1  # the dead and the closed claims hold no share

    from engine.host_client import HostEngineClient

    client = object.__new__(HostEngineClient)  # the share alone: no engine core behind it
    client._host_in_flight = 4 * 192  # --host_feeders 4 x the per-process share the plan gave each
    client.attached = 1
    assert client.in_flight_limit() == 768  # alone on the core: the host's whole limit, not 192
    client.attached = 3
    assert client.in_flight_limit() == 256


@pytest.mark.engine
def test_a_host_engine_core_that_fails_to_start_logs_its_supervisors_output_and_names_the_cause(tmp_path, monkeypatch,
                                                                                                 caplog):
    """The host's supervisor (its own session, outliving its starter) writes to a file the starter follows: its
    traceback reaches Python logging, and the start fails in one line with the cause."""
    from engine import host
    from engine.api import EngineStartFailed

    monkeypatch.setenv("VISION_BATCH_HOST_ENGINE_DIR", str(tmp_path / "hosts"))
    missing = str(tmp_path / "no-such-checkpoint")
    settings = _settings(missing, host_feeders=2, start_timeout_s=300.0)
    caplog.set_level(logging.INFO, logger="engine.output")
    with pytest.raises(EngineStartFailed) as failure:
        host.acquire_slot(settings, missing)
    message = str(failure.value)
    assert message.startswith("the host's engine core failed to start: ") and "\n" not in message, message
    cause = message.split("failed to start: ", 1)[1]
    assert "exit code" not in cause  # the supervisor's own error, not only that it ended
    lines = [r for r in caplog.records if r.name == "engine.output"]
    assert any(r.levelno == logging.ERROR and r.getMessage().endswith(cause) for r in lines), (cause, lines[-5:])


def test_no_profile_shares_an_engine_core_until_measured():
    from engine.profiles import PROFILES

    assert {name: profile.host_feeders for name, profile in PROFILES.items() if profile.host_feeders != 1} == {}


# ---------------------------------------------------------------- 5. every engine has an owner


def test_engines_nobody_holds_are_closed_when_the_process_exits():
    """The registry keeps a released engine for the next holder (idle_s); at interpreter exit it closes those
    instead of leaving them to die with the process (their compile cache saved, the host's slot released)."""
    from engine.fake import FakeEngine
    from engine.registry import EngineRegistry

    registry = EngineRegistry(lambda settings: FakeEngine({}), idle_s=600)
    held = registry.acquire(_settings("a"))
    idle = registry.acquire(_settings("b"))
    registry.release(idle)
    registry.close_idle()
    assert idle.closed and not held.closed and registry.live == 1
    registry.release(held)
    registry.close_idle()
    assert held.closed and registry.live == 0
