"""One vLLM engine core per host, fed by several worker processes (`EngineSettings.host_feeders` > 1).

On an accelerator VM one Python process cannot feed the chip (BENCHMARKS.md,
"The host feed"): decoding, rendering (vLLM's multimodal processing) and
detokenizing all share its GIL. With `host_feeders = N`, N worker (Beam SDK)
processes of a host each do that work for their own items and send the
rendered requests to ONE engine-core process, which alone owns the device and
batches every process's requests together (one scheduler, one KV cache, so
the prefix cache is shared across processes). This is vLLM 0.32's own layout
for `vllm serve --api-server-count N` (vllm/entrypoints/cli/serve.py
`run_multi_api_server`): the engine core started by `launch_core_engines`
with one input/output socket pair per front end, and each front end an
`AsyncLLM(..., client_addresses, client_count, client_index)`
(`engine.host_client`). What vLLM cannot do for us, because the
front ends here are processes the runner starts, not children of one
launcher, is done by a per-host directory:

- The first process to take the host's file lock starts a *supervisor*
  (`python -m engine.host GENERATION_DIR`, in its own session so
  it outlives the process that started it), which starts the engine core
  with `launch_core_engines` and writes `core.json` (pids, socket addresses)
  once the core is ready. Every process, the starter included, then claims
  a *slot* (a `slot-I.json` file) under the lock and attaches as client I.
  The sockets are `ipc://` paths in the same directory, bound by each client
  (vLLM's clients bind, its engine core connects), so nothing is chosen
  twice and no port can be taken in between.
- A slot whose process died (provably: `ProcessId.alive`, checked under the
  lock) is taken over by the next process that finds no free slot. The core
  connects its per-slot sockets to the client's bound `ipc://` paths
  (vllm/v1/engine/core.py `process_input_sockets`: a DEALER, and
  `process_output_sockets`: a PUSH, both `bind=False`), and ZeroMQ
  reconnects a connecting socket by itself once a new peer binds its path.
  What vLLM does not do is greet the new client: the core sends its ready
  message to each input socket once, at start, and `MPClient.__init__`
  (vllm/v1/engine/core_client.py) waits for it. So the supervisor keeps that
  greeting (one extra input socket of its own, `greeting.json`), and a
  reclaiming client (`engine.host_client`) is greeted with it on a private
  input path, then points the slot's input path at that one (a symlink) and
  waits, by sending with `ROUTER_MANDATORY`, until the core's DEALER is routable
  (`RECLAIM_TIMEOUT_S`, then `HostEngineReclaimFailed`). Outputs of the dead
  client's requests still queued for its socket reach the new client, whose
  `OutputProcessor` skips request ids it does not know
  (vllm/v1/engine/output_processor.py `process_outputs`); the new client
  aborts those still running in the core. The core has `N + SPARE_SLOTS`
  slots; a process that finds every slot held by a live process fails its
  engine start (`HostEngineFull`), which fails its bundles; Beam retries them.
- One container: every feeder must see the same temp dir and PIDs. A core
  recorded by another container stops a process (`HostEngineNotShared`).
  Processes that share no temp dir cannot see each other's state, so
  before starting a core a process checks the accelerator's device files
  (`accelerators_held_elsewhere`: busy, yet held by no process it can see)
  and stops with the same error; a second core that starts anyway fails
  with its runtime's "device in use" message, which `engine.output.cause_of`
  turns into the same one line naming the fix (`--host_feeders=1`).
- Lifetime (a *generation* is one supervisor + its engine core):
  * a client process dies (killed, crashed): the other clients go on; its
    requests run in the core, their outputs dropped, until a new process
    reclaims its slot and aborts them (or to their end, if none does);
  * the process that started the core dies: nothing changes, the supervisor
    does not belong to it;
  * the engine core or its supervisor dies: every client sees it within
    `MONITOR_INTERVAL_S` (pid watch) and fails all its outstanding requests
    with `EngineDeadError` (never a hang); its bundles fail and are retried,
    and the next engine start on the host retires what is left of earlier
    generations (terminates the survivors they recorded, so only one core
    ever holds the device) and starts a new one;
  * every client gone (closed, or dead for `idle_grace_s()`): the
    supervisor shuts the core down and the generation ends, so a finished
    local run leaves no engine behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterator, Optional

from engine import compile_cache, vllm_internals
from engine.api import EngineSettings, EngineStartFailed, EngineStartTimeout
from engine.output import TAIL_LINES, EngineOutput, accelerator_in_use
from engine.process import prepare_process
from library import environment

_LOG = logging.getLogger(__name__)

# Slots beyond host_feeders, for processes that start while the ones they replace still live, or before a
# dead one's slot is seen dead (a dead client's slot is reclaimed: see the module docstring).
SPARE_SLOTS = 4
# How long a client reclaiming a dead client's slot waits for the core's socket to reconnect to it. ZeroMQ
# retries a connecting socket every ZMQ_RECONNECT_IVL, 100 ms by default (zmq_setsockopt(3)); vLLM sets none.
RECLAIM_TIMEOUT_S = 30.0
# How long the supervisor waits for the core's greeting on its own input socket once the core is ready
# (the core sends it before it reports ready: vllm/v1/engine/core.py `process_input_sockets`).
_GREETING_TIMEOUT_S = 60.0
# How often clients check that the engine core and its supervisor live, and how often the supervisor
# checks its core and its clients: a dead core fails outstanding requests within this time.
MONITOR_INTERVAL_S = 0.5
# A core with no live client is kept this long, so that a client process the runner restarts (vLLM and
# the model's processor take ~10-20 s to import here) finds it still running instead of paying for a
# new engine start (an XLA compile on TPU). A client that closes its engine releases its slot at once.
_IDLE_GRACE_S = 30.0
# The device files a TPU runtime opens, one process at a time: /dev/accelN, else /dev/vfio/N (openxla/xla
# xla/stream_executor/tpu/tpu_initialize_util.cc `GetTpuDriverFile`). A VFIO group is open in one file at a time,
# a second open gets EBUSY (torvalds/linux drivers/vfio/group.c `vfio_group_fops_open`: "Do we need multiple
# instances of the group open?  Seems not.").
_ACCELERATOR_DEVICES = ("/dev/vfio/[0-9]*", "/dev/accel[0-9]*")
# How long a new generation waits for the old supervisor to shut its core down before killing it.
_RETIRE_TIMEOUT_S = 30.0


class HostEngineFull(RuntimeError):
    """Every client slot of this host's engine core is taken by a live process."""


class HostEngineReclaimFailed(RuntimeError):
    """The host's engine core did not reconnect to the dead client's slot this process took over."""


class HostEngineNotShared(RuntimeError):
    """The host's engine core was started from another container: the feeding processes do not share one."""


def container_identity() -> str:
    """This process's container, as the kernel tells it: its PID and mount namespaces.

    Processes of one container (Beam's boot starts sibling SDK processes side
    by side in one: apache/beam sdks/python/container/boot.go) share both; a
    process of another container sees other PIDs (the host's pid records would
    look dead to it, and it would start a second engine core on the same
    accelerator) and, usually, another temp dir.
    """
    parts = []
    for namespace in ("pid", "mnt"):
        try:
            parts.append(f"{namespace}:{os.stat(f'/proc/self/ns/{namespace}').st_ino}")
        except OSError:
            parts.append(f"{namespace}:unknown")
    return ",".join(parts)


def host_engine_root() -> pathlib.Path:
    """Where hosts keep their engine-core state: the temp dir, which every SDK process of a Dataflow VM
    shares (Beam's own per-VM sharing, apache_beam.utils.multi_process_shared, keeps its lock and address
    file there); `VISION_BATCH_HOST_ENGINE_DIR` overrides it (library/environment.py)."""
    return pathlib.Path(environment.read(environment.HOST_ENGINE_DIR) or os.path.join(tempfile.gettempdir(), "vb-host-engine"))


def idle_grace_s() -> float:
    """`_IDLE_GRACE_S`, or `VISION_BATCH_HOST_ENGINE_IDLE_S` (library/environment.py)."""
    return float(environment.read(environment.HOST_ENGINE_IDLE_S) or _IDLE_GRACE_S)


@dataclasses.dataclass(frozen=True)
class ProcessId:
    """A process, told apart from a later one that reuses its pid by its start time."""

    pid: int
    started: float

    @staticmethod
    def of(pid: int) -> "ProcessId":
        import psutil

        return ProcessId(pid, psutil.Process(pid).create_time())

    def alive(self) -> bool:
        import psutil

        try:
            process = psutil.Process(self.pid)
            return process.create_time() == self.started and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def terminate(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after `timeout`; nothing if it is already gone."""
        import psutil

        if not self.alive():
            return
        process = psutil.Process(self.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
            try:
                process.wait(timeout)
            except psutil.TimeoutExpired:
                process.kill()
                process.wait(10)


@dataclasses.dataclass(frozen=True)
class CoreState:
    """`core.json`: one generation's engine core, written by its supervisor once the core is ready."""

    generation_dir: str
    supervisor: ProcessId
    core: ProcessId
    slots: int
    inputs: tuple[str, ...]  # ZMQ address of each client's input socket (requests)
    outputs: tuple[str, ...]  # ... and of its output socket (results)
    container: str = ""  # the supervisor's container_identity(): every client must share it

    def alive(self) -> bool:
        return self.supervisor.alive() and self.core.alive()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "CoreState":
        raw = json.loads(text)
        return CoreState(
            generation_dir=raw["generation_dir"],
            supervisor=ProcessId(**raw["supervisor"]),
            core=ProcessId(**raw["core"]),
            slots=raw["slots"],
            inputs=tuple(raw["inputs"]),
            outputs=tuple(raw["outputs"]),
            container=raw.get("container", ""),
        )


@dataclasses.dataclass(frozen=True)
class Slot:
    """One client's place on the host's engine core."""

    state: CoreState
    index: int
    reclaimed: bool = False  # a dead client held it: the core greeted that one, not this one

    @property
    def claim(self) -> pathlib.Path:
        return _claim_path(pathlib.Path(self.state.generation_dir), self.index)

    def client_addresses(self) -> dict[str, str]:
        """What `AsyncLLM(client_addresses=...)` takes for an engine launched elsewhere.

        A reclaimed slot's input socket binds a path of this process's own (`point_core_here` then
        points the slot's path at it), so the core cannot reach it before this client was greeted.
        """
        inputs = self.state.inputs[self.index]
        return {"input_address": f"{inputs}.{os.getpid()}" if self.reclaimed else inputs,
                "output_address": self.state.outputs[self.index]}

    def greeting(self) -> tuple[bytes, bytes]:
        """The core's ready message as every client received it at start: (the core's ZMQ identity, payload)."""
        raw = json.loads((pathlib.Path(self.state.generation_dir) / "greeting.json").read_text())
        return bytes.fromhex(raw["identity"]), bytes.fromhex(raw["payload"])

    def point_core_here(self) -> None:
        """Make the slot's input path (where the core's DEALER reconnects) lead to this process's input socket.

        A Unix socket path is resolved like any path, so the core's next reconnect attempt follows the
        link. Replaced atomically: the core never finds the path missing. An earlier reclaimer's own
        path (a dead process's socket file) is removed.
        """
        path = pathlib.Path(self.state.inputs[self.index].removeprefix("ipc://"))
        previous = os.readlink(path) if path.is_symlink() else None
        link = path.with_name(path.name + f".link{os.getpid()}")
        link.unlink(missing_ok=True)
        os.symlink(f"{path.name}.{os.getpid()}", link)
        os.replace(link, path)
        if previous is not None and previous != f"{path.name}.{os.getpid()}":
            (path.parent / previous).unlink(missing_ok=True)

    def release(self) -> None:
        """This process is done with its slot (the slot is not reused; the core may retire once all are)."""
        with contextlib.suppress(OSError):
            claim = json.loads(self.claim.read_text())
            _write_atomic(self.claim, json.dumps({**claim, "closed": True}))


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _claim_path(generation: pathlib.Path, index: int) -> pathlib.Path:
    return generation / f"slot-{index}.json"


def _host_dir(settings_key: str) -> pathlib.Path:
    # One directory per engine settings: processes of another job (other settings) never attach to this
    # core. Short names: ipc:// paths must fit a Unix socket address (107 bytes).
    path = host_engine_root() / hashlib.sha256(settings_key.encode()).hexdigest()[:12]
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _host_lock(host: pathlib.Path, blocking: bool = True) -> Iterator[bool]:
    with open(host / "lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _current_generation(host: pathlib.Path) -> Optional[pathlib.Path]:
    pointer = host / "current"
    return host / pointer.read_text().strip() if pointer.exists() else None


def _read_state(generation: pathlib.Path) -> Optional[CoreState]:
    path = generation / "core.json"
    return CoreState.from_json(path.read_text()) if path.exists() else None


def _claims(generation: pathlib.Path, slots: int) -> dict[int, dict[str, Any]]:
    claims = {}
    for index in range(slots):
        path = _claim_path(generation, index)
        if path.exists():
            claims[index] = json.loads(path.read_text())
    return claims


def _claim_process(claim: dict[str, Any]) -> ProcessId:
    return ProcessId(claim["pid"], claim["started"])


def _claim_live(claim: dict[str, Any]) -> bool:
    return not claim.get("closed") and _claim_process(claim).alive()


def live_clients(state: CoreState) -> int:
    """How many processes are attached to the core now (claimed a slot, alive, not closed)."""
    return sum(_claim_live(claim) for claim in _claims(pathlib.Path(state.generation_dir), state.slots).values())


def acquire_slot(settings: EngineSettings, local_model: str) -> Slot:
    """This process's slot on the host's engine core for `settings`, starting the core if none runs.

    Blocks while another process starts the core (minutes on TPU). Raises
    HostEngineFull when every slot is held by a live process.
    """
    host = _host_dir(settings.key())
    with _host_lock(host):
        generation = _current_generation(host)
        state = _read_state(generation) if generation is not None else None
        if state is not None and state.container != container_identity():
            # Checked before anything else: this process cannot even see whether that core lives, and a core
            # of its own would open the same accelerator.
            raise HostEngineNotShared(
                f"--host_feeders={settings.host_feeders}: the host's engine core in {state.generation_dir} was started "
                f"from another container ({state.container}; this process: {container_identity()}): the worker's SDK "
                "processes do not share one container, so they cannot share one engine core, and a second core would "
                "fail to open the accelerator. Run with --host_feeders=1 (one SDK process per worker VM)."
            )
        if state is not None and state.alive():
            claims = _claims(generation, state.slots)
            free = next((index for index in range(state.slots) if index not in claims), None)
            if free is not None:
                return _claim(state, free)
            # Every slot was claimed once: take over one whose process is gone (not merely closed: a live
            # process may still hold its sockets). Without the core's greeting no client can be greeted.
            dead = sorted(index for index, claim in claims.items() if not _claim_process(claim).alive())
            if dead and (generation / "greeting.json").exists():
                return _claim(state, dead[0], reclaimed=True)
            live = sorted(claim["pid"] for claim in claims.values() if _claim_live(claim))
            if live:
                raise HostEngineFull(
                    f"all {state.slots} client slots of this host's engine core ({state.generation_dir}) are taken, "
                    f"{len(live)} by live processes {live}: more worker processes feed this host than "
                    f"--host_feeders={settings.host_feeders} (+{SPARE_SLOTS} spare slots)"
                )
        state = _start_generation(host, settings, local_model)
        return _claim(state, 0)


def _claim(state: CoreState, index: int, reclaimed: bool = False) -> Slot:
    me = ProcessId.of(os.getpid())
    path = _claim_path(pathlib.Path(state.generation_dir), index)
    if reclaimed:
        _LOG.warning("every client slot of the host's engine core (pid %d) is taken: reclaiming slot %d of %d, "
                     "whose process (%s) is dead", state.core.pid, index, state.slots, json.loads(path.read_text()))
    _write_atomic(path, json.dumps(dataclasses.asdict(me)))
    _LOG.info("attaching to the host's engine core (pid %d) as client %d of %d", state.core.pid, index, state.slots)
    return Slot(state, index, reclaimed)


def _generations(host: pathlib.Path) -> list[pathlib.Path]:
    return sorted((path for path in host.glob("g*") if path.name[1:].isdigit()), key=lambda path: int(path.name[1:]))


def _retire_all(host: pathlib.Path) -> None:
    """End what is left of earlier generations before a new one starts, so that only one core ever holds
    the device: each supervisor is told to stop its core, and whatever outlives the timeout is killed."""
    for generation in _generations(host):
        state = _read_state(generation)
        if state is None:  # its supervisor died before its core was ready, or is still starting it
            record = generation / "supervisor.json"
            if record.exists():
                ProcessId(**json.loads(record.read_text())).terminate(_RETIRE_TIMEOUT_S)
        else:
            if state.alive():
                _LOG.warning("retiring the host's engine-core generation %s (core pid %d)", generation.name, state.core.pid)
            state.supervisor.terminate(_RETIRE_TIMEOUT_S)
            state.core.terminate(_RETIRE_TIMEOUT_S)
        shutil.rmtree(generation, ignore_errors=True)


def accelerators_held_elsewhere(patterns: tuple[str, ...] = _ACCELERATOR_DEVICES) -> list[str]:
    """Accelerator device files that are open in a process this container cannot see.

    Opened and closed at once (O_NONBLOCK): a device that refuses with EBUSY
    while no visible process has it open belongs to an engine of another
    container: processes that share no /tmp find neither this host's engine
    state nor libtpu's lock file (/tmp/libtpu_lockfile, `TryAcquireTpuLock`
    in the file cited at `_ACCELERATOR_DEVICES`), and meet only at the device.
    """
    held = []
    for path in sorted({path for pattern in patterns for path in glob.glob(pattern)}):
        try:
            os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        except OSError as exc:
            if exc.errno == errno.EBUSY and not visible_holders(path):
                held.append(path)
    return held


def visible_holders(path: str) -> list[int]:
    """The pids of the processes this one can see that have `path` open (as libtpu's `IsTpuUsed` looks: /proc/PID/fd)."""
    holders = []
    for fds in pathlib.Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == path for fd in fds.iterdir()):
                holders.append(int(fds.parent.name))
    return holders


def _start_generation(host: pathlib.Path, settings: EngineSettings, local_model: str) -> CoreState:
    earlier = _generations(host)
    _retire_all(host)
    # Before paying for a start (minutes; an XLA compile on TPU): a device another container's engine holds
    # would fail this core's start with the runtime's own error.
    held = accelerators_held_elsewhere()
    if held:
        raise HostEngineNotShared(
            f"--host_feeders={settings.host_feeders}: "
            + accelerator_in_use(f"{', '.join(held)} refused to open (busy) and no process of this container has it open")
        )
    generation = host / f"g{int(earlier[-1].name[1:]) + 1 if earlier else 1}"
    generation.mkdir()
    slots = settings.host_feeders + SPARE_SLOTS
    (generation / "request.json").write_text(
        json.dumps({"settings": dataclasses.asdict(settings), "local_model": local_model, "slots": slots}, default=str)
    )
    # Its own session: the supervisor (and the engine core it starts) outlive the process that started
    # it, and a signal to that process's group (Beam's boot stops workers that way) does not reach them.
    # Its output, and its engine core's, goes to a file in the generation (a pipe would break when the
    # starting process dies), which this process follows into its log while the core starts
    # (engine.output); a client that sees the core die logs the file's tail (HostEngineClient).
    output = EngineOutput(output_path(generation), "host engine core")
    with open(output.path, "ab") as streams:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "engine.host", str(generation)], start_new_session=True,
            stdout=streams, stderr=subprocess.STDOUT,
        )
    _write_atomic(generation / "supervisor.json", json.dumps(dataclasses.asdict(ProcessId.of(supervisor.pid))))
    _write_atomic(host / "current", generation.name)
    _LOG.info("starting the host's engine core (generation %s, %d client slots)", generation.name, slots)
    deadline = time.monotonic() + settings.start_timeout_s
    try:
        while time.monotonic() < deadline:
            state = _read_state(generation)
            if state is not None:
                return state
            if supervisor.poll() is not None:
                cause = output.cause() or f"its supervisor exited with code {supervisor.returncode}"
                raise EngineStartFailed(f"the host's engine core failed to start: {cause}")
            time.sleep(MONITOR_INTERVAL_S)
        output.flush()
        lines = output.lines()
        supervisor.terminate()
        raise EngineStartTimeout(
            f"the host's engine core did not become ready within {settings.start_timeout_s:g} s "
            "(--engine_start_timeout_s): waited for its supervisor to start vLLM's engine core and write core.json"
            + (f"; its last output: {lines[-1].strip()}" if lines else "")
        )
    finally:
        output.close(remove=False)  # the file stays: clients log its tail if the core dies


def output_path(generation: pathlib.Path) -> pathlib.Path:
    """Where a generation's supervisor and engine core write their output."""
    return generation / "output.log"


def output_tail(generation: pathlib.Path) -> list[str]:
    """The last lines of a generation's output (for a client that saw its core die)."""
    try:
        lines = output_path(generation).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if line.strip()][-TAIL_LINES:]


# ---- the supervisor process -------------------------------------------------------------------


def _serve(generation: pathlib.Path) -> int:
    """Start the engine core for the clients of `generation`, keep it while they live; the exit code says why it ended."""
    from vllm.usage.usage_lib import UsageContext

    request = json.loads((generation / "request.json").read_text())
    settings = EngineSettings(**request["settings"])
    slots = request["slots"]
    prepare_process(settings)
    cache = compile_cache.open_cache(settings)  # the compile happens here, in the core this process starts
    vllm_config = client_engine_args(settings, request["local_model"], slots, -1).create_engine_config(UsageContext.ENGINE_CONTEXT)
    inputs = [f"ipc://{generation}/in-{index}" for index in range(slots)]
    outputs = [f"ipc://{generation}/out-{index}" for index in range(slots)]
    serving = threading.Event()
    stop = threading.Event()

    def on_sigterm(*_: Any) -> None:
        # While the core starts, leave at once: launch_core_engines then stops the half-started core
        # (it must not be left holding the device). Once it runs, the watch loop stops it.
        if not serving.is_set():
            raise SystemExit("SIGTERM while the engine core was starting")
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    # One input socket more than there are slots, bound here: the core's greeting, kept for clients that
    # reclaim a dead client's slot (see the module docstring). No request is ever sent on it.
    greeter = _GreetingKeeper(generation)
    try:
        manager = vllm_internals.launch_engine_core(vllm_config, [*inputs, greeter.address], [*outputs, greeter.output_address])
    except BaseException:
        greeter.close()
        raise
    (core,) = manager.processes
    state = CoreState(
        generation_dir=str(generation),
        supervisor=ProcessId.of(os.getpid()),
        core=ProcessId.of(core.pid),
        slots=slots,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        container=container_identity(),
    )
    try:
        cache.after_start()  # the warm-up's check: a start that saved no compile fails here
        greeter.keep()
    except BaseException:
        manager.shutdown(timeout=_RETIRE_TIMEOUT_S)
        greeter.close()
        raise
    _write_atomic(generation / "core.json", state.to_json())
    serving.set()
    _LOG.info("host engine core ready: pid %d, %d client slots, %s", core.pid, slots, generation)
    try:
        reason = _watch(generation, state, core, stop)
    finally:
        manager.shutdown(timeout=_RETIRE_TIMEOUT_S)
        greeter.close()
        cache.after_close()
    _LOG.info("host engine core (generation %s) stopped: %s", generation.name, reason)
    return 1 if reason == "engine core died" else 0


class _GreetingKeeper:
    """The supervisor's own client socket on its core: receives the core's greeting and writes `greeting.json`."""

    def __init__(self, generation: pathlib.Path):
        import zmq

        self._generation = generation
        self.address = f"ipc://{generation}/in-greeting"
        self.output_address = f"ipc://{generation}/out-greeting"  # never bound: the core sends nothing there
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.bind(self.address)

    def keep(self) -> None:
        """Write the greeting for reclaiming clients; without it, a dead client's slot stays unused (logged)."""
        if not self._socket.poll(timeout=_GREETING_TIMEOUT_S * 1000):
            _LOG.error("the engine core sent no greeting within %g s: dead clients' slots cannot be reclaimed",
                       _GREETING_TIMEOUT_S)
            return
        identity, payload = self._socket.recv_multipart()
        _write_atomic(self._generation / "greeting.json", json.dumps({"identity": identity.hex(), "payload": payload.hex()}))

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()


def _watch(generation: pathlib.Path, state: CoreState, core: Any, stop: threading.Event) -> str:
    host = generation.parent
    idle_since = time.monotonic()
    while not stop.is_set():
        if not core.is_alive():
            return "engine core died"
        claims = _claims(generation, state.slots)
        live = [claim for claim in claims.values() if _claim_live(claim)]
        if live:
            idle_since = time.monotonic()
        else:
            # No live client: retire at once if every client closed its engine, else after the grace
            # (from the last moment one lived, or from the start when none ever attached).
            grace = 0.0 if claims and all(claim.get("closed") for claim in claims.values()) else idle_grace_s()
            if time.monotonic() - idle_since >= grace:
                # Decide under the host lock: a process may be claiming a slot right now.
                with _host_lock(host, blocking=False) as locked:
                    if locked and not any(_claim_live(c) for c in _claims(generation, state.slots).values()):
                        if _current_generation(host) == generation:
                            (host / "current").unlink()
                        return "no client left"
        stop.wait(MONITOR_INTERVAL_S)
    return "SIGTERM"


def client_engine_args(settings: EngineSettings, local_model: str, slots: int, client_index: int) -> Any:
    """`vllm.EngineArgs` of the host's engine core (`client_index` -1, as `vllm serve` builds it) or of one client."""
    from vllm import EngineArgs

    args = EngineArgs(model=local_model, **settings.engine_args)
    vllm_internals.api_server_args(args, slots, client_index)
    return args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s host-engine %(message)s")
    sys.exit(_serve(pathlib.Path(sys.argv[1])))
