"""One run at a time per output location: a lock file `OUT/.vision_batch.lock`, local or gs://.

The lock names its holder (`LockRecord`: run id, start time, host, pid), so a
second run into the same `--output` is refused in one line that says who is
writing there. When is a lock left by a killed run free to take?

- Local folders: the holder keeps an exclusive `flock` on the lock file for
  the whole run. The kernel drops it when the process ends, however it ends
  (SIGKILL and OOM kills included), so a killed run's lock is free at once;
  a lock is live exactly while some process holds the flock. Taking it over
  is one `flock` call: two runs racing for it cannot both win. (This relies
  on the filesystem honouring flock: local disks and NFSv4 do; FUSE mounts
  of a bucket may not: write to gs:// directly instead.)
- gs://: nothing holds an object for a process, so the holder rewrites the
  record every `HEARTBEAT_S` and the record says how long it may go quiet
  (`stale_after_s`: the heartbeat interval, plus the longest one write may
  keep retrying under the job's `--gcs_retry_timeout_s`, plus `CLOCK_SKEW_S`
  for the two hosts' clocks). A record is stale when its heartbeat is older
  than that, or at once when it was written on this host by a process that
  no longer exists (`is_stale`). Every write is conditional on the
  object's generation, GCS's compare-and-swap: creation with
  `ifGenerationMatch=0` ("succeed only if there are no live versions of the
  object", GCS JSON API, objects.insert), takeover and heartbeat with the
  generation read, so of two runs racing for a lock exactly one wins, and a
  holder whose lock was taken over learns it at its next heartbeat.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Optional, Protocol

from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.options.pipeline_options import PipelineOptions

from configuration.options import UsageError
from library.storage import RetryBudget
from transforms.sinks import LOCK_FILE

_LOG = logging.getLogger("vision_batch")

HEARTBEAT_S = 30.0  # one small write per half minute per run: negligible next to the run's own traffic
CLOCK_SKEW_S = 60.0  # hosts' clocks (NTP keeps them within a second; a minute leaves room for a bad one)
# A local lock file found held but still empty is being written by its new holder: look again this often.
_RETRY_S, _ATTEMPTS = 0.05, 40


@dataclasses.dataclass(frozen=True)
class LockRecord:
    """Who holds an output's lock; the lock file's content (JSON)."""

    run_id: str
    host: str
    pid: int
    started_at: str  # ISO 8601, UTC
    heartbeat_at: str  # gs:// only: rewritten every HEARTBEAT_S; local locks need none (see module docstring)
    stale_after_s: float  # gs:// only: the holder is taken for dead this long after its last heartbeat

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @staticmethod
    def from_json(data: bytes) -> Optional["LockRecord"]:
        """The record, or None for a lock file being written (empty) or not this pipeline's."""
        try:
            return LockRecord(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        return f"run {self.run_id} (started {self.started_at} on host {self.host}, pid {self.pid})"


class OutputLocked(UsageError):
    """Another live run holds the output's lock."""

    def __init__(self, output: str, holder: Optional[LockRecord]):
        who = holder.describe() if holder is not None else (
            f"another run (its lock {lock_path(output)} does not say which; remove it if no run writes there)"
        )
        super().__init__(
            f"--output {output} is being written by {who}: wait for it to end, or choose another --output "
            f"(a killed run's lock is taken over automatically: README, 'Output safety')"
        )
        self.holder = holder


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def is_stale(record: LockRecord, now: datetime.datetime, host: str, alive: Callable[[int], bool] = pid_alive) -> bool:
    """The gs:// rule: a holder is dead when quiet past its `stale_after_s`, or gone from this very host.

    Only the holder's own host can see its pid; a pid found alive may be a
    reused one, so the heartbeat's age decides then too.
    """
    quiet_s = (now - datetime.datetime.fromisoformat(record.heartbeat_at)).total_seconds()
    return quiet_s > record.stale_after_s or (record.host == host and not alive(record.pid))


def _held_live(record: Optional[LockRecord], generation: int, host: str) -> bool:
    """Whether a gs:// lock read as (`record`, `generation`) is held by a live run (0: no lock object)."""
    return bool(generation) and not (record is not None and is_stale(record, _now(), host))


def new_record(run_id: str, retry_timeout_s: float) -> LockRecord:
    started = _now().isoformat(timespec="seconds")
    return LockRecord(
        run_id=run_id, host=socket.gethostname(), pid=os.getpid(), started_at=started, heartbeat_at=started,
        stale_after_s=HEARTBEAT_S + retry_timeout_s + CLOCK_SKEW_S,
    )


class HeldLock(Protocol):
    record: LockRecord

    def release(self) -> None:
        """Stop holding and remove the lock file; safe to call twice."""


def lock_path(output: str) -> str:
    return f"{output}/{LOCK_FILE}"


def _is_local(output: str) -> bool:
    return isinstance(FileSystems.get_filesystem(output), LocalFileSystem)


def refuse_if_held(output: str, options: PipelineOptions) -> None:
    """Raise OutputLocked if a live run holds `output`'s lock; takes nothing (the fast check before a run starts)."""
    if _is_local(output):
        _local_check(output)
    else:
        _gcs_check(output, options)


def acquire(output: str, run_id: str, options: PipelineOptions) -> tuple[HeldLock, Optional[LockRecord]]:
    """Take `output`'s lock for `run_id`; returns it and the killed run's record it took over, if any.

    Raises OutputLocked naming the live holder.
    """
    record = new_record(run_id, RetryBudget.from_options(options).timeout_s)
    if _is_local(output):
        return _acquire_local(output, record)
    return _acquire_gcs(output, record, options)


# -- local folders: flock ---------------------------------------------------------------------------------

def _read_fd(fd: int) -> bytes:
    return os.pread(fd, 1 << 16, 0)


def _local_check(output: str) -> None:
    try:
        fd = os.open(lock_path(output), os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        # A shared lock conflicts only with a holder's exclusive one: checking never blocks another check.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # succeeds: nobody holds it (a killed run's file, free to take)
    except BlockingIOError:
        raise OutputLocked(output, LockRecord.from_json(_read_fd(fd))) from None
    finally:
        os.close(fd)  # also drops the shared lock


@dataclasses.dataclass
class _LocalLock:
    path: str
    fd: Optional[int]
    record: LockRecord

    def release(self) -> None:
        if self.fd is None:
            return
        # Removed while still held: a run opening the path afterwards creates a new file instead of
        # locking this one (`_acquire_local` checks it locked the file the path names).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def _acquire_local(output: str, record: LockRecord) -> tuple[_LocalLock, Optional[LockRecord]]:
    os.makedirs(output, exist_ok=True)
    path = lock_path(output)
    seen: Optional[LockRecord] = None
    for _ in range(_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Held: by a live run, or for an instant by a run's check (`_local_check`) or a new holder
            # still writing its record. Look again briefly before refusing.
            seen = LockRecord.from_json(_read_fd(fd)) or seen
            os.close(fd)
            time.sleep(_RETRY_S)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder released (removed) it between our open and flock: open the path again
            os.close(fd)
            continue
        previous = LockRecord.from_json(_read_fd(fd))
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.to_json(), 0)
        os.fsync(fd)
        return _LocalLock(path, fd, record), previous
    raise OutputLocked(output, seen)


# -- gs://: generation preconditions and a heartbeat ------------------------------------------------------

def _blob(uri: str, options: PipelineOptions) -> Any:
    from apache_beam.io.gcp import gcsio  # only for gs:// outputs: the client Beam itself would build

    bucket, _, name = uri[len("gs://"):].partition("/")
    return gcsio.create_storage_client(options).bucket(bucket).blob(name)


def _read_gcs(blob: Any, retry: Any) -> tuple[Optional[LockRecord], int]:
    """The lock object's record and generation; (None, 0) when there is none."""
    from google.api_core.exceptions import NotFound, PreconditionFailed

    for _ in range(_ATTEMPTS):
        try:
            blob.reload(retry=retry)
            generation = int(blob.generation)  # read first: the download's answer does not carry it
            return LockRecord.from_json(blob.download_as_bytes(if_generation_match=generation, retry=retry)), generation
        except NotFound:
            return None, 0
        except PreconditionFailed:
            continue  # rewritten between the two requests (a heartbeat): read the new one
    raise OutputLocked(f"gs://{blob.bucket.name}/{blob.name.rsplit('/', 1)[0]}", None)  # rewritten all along


def _write_gcs(blob: Any, record: LockRecord, generation: int, retry: Any) -> int:
    """Write the record if the object's generation is still `generation` (0: if there is none); the new generation."""
    blob.upload_from_string(record.to_json(), content_type="application/json", if_generation_match=generation, retry=retry)
    return int(blob.generation)


def _gcs_check(output: str, options: PipelineOptions) -> None:
    record, generation = _read_gcs(_blob(lock_path(output), options), RetryBudget.from_options(options).retry())
    if _held_live(record, generation, socket.gethostname()):
        raise OutputLocked(output, record)


class _GcsLock:
    """A held gs:// lock: its generation, and the thread that keeps its heartbeat fresh."""

    def __init__(self, blob: Any, record: LockRecord, generation: int, retry: Any):
        self.record = record
        self._blob, self._generation, self._retry = blob, generation, retry
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(HEARTBEAT_S,), name="output-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, interval_s: float) -> None:
        from google.api_core.exceptions import PreconditionFailed

        while not self._stopped.wait(interval_s):
            beat = dataclasses.replace(self.record, heartbeat_at=_now().isoformat(timespec="seconds"))
            try:
                self._generation = _write_gcs(self._blob, beat, self._generation, self._retry)
                self.record = beat
            except PreconditionFailed:
                # Only a run that judged this one dead rewrites the lock: it was quiet past stale_after_s.
                _LOG.error("the lock of --output was taken over by another run: this run's output is no longer its own")
                return
            except Exception as exc:  # noqa: BLE001 - storage down past the budget: try again next beat
                _LOG.warning("could not refresh the --output lock's heartbeat: %s", exc)

    def release(self) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        if self._stopped.is_set():
            return
        self._stopped.set()
        self._thread.join()
        with contextlib.suppress(NotFound, PreconditionFailed):  # gone or taken over: not ours to delete
            self._blob.delete(if_generation_match=self._generation, retry=self._retry)


def _acquire_gcs(output: str, record: LockRecord, options: PipelineOptions) -> tuple[_GcsLock, Optional[LockRecord]]:
    from google.api_core.exceptions import PreconditionFailed

    uri = lock_path(output)
    blob, retry = _blob(uri, options), RetryBudget.from_options(options).retry()
    try:
        return _GcsLock(blob, record, _write_gcs(blob, record, 0, retry), retry), None
    except PreconditionFailed:
        pass  # there is a lock already
    existing, generation = _read_gcs(blob, retry)
    if existing is not None and (existing.run_id, existing.host, existing.pid) == (record.run_id, record.host, record.pid):
        # Our own create, retried after its answer was lost: the first attempt took effect.
        return _GcsLock(blob, record, generation, retry), None
    if _held_live(existing, generation, record.host):
        raise OutputLocked(output, existing)
    try:
        # Over the stale lock, or create if it was removed meanwhile (generation 0): one racer wins.
        return _GcsLock(blob, record, _write_gcs(blob, record, generation, retry), retry), existing
    except PreconditionFailed:
        raise OutputLocked(output, _read_gcs(blob, retry)[0]) from None
