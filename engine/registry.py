"""The one owner of a process's engines: built on first use, shared, closed when no one needs them.

Every `transforms.run_tasks.RunTasks` instance of a worker process acquires
its engine in `setup` and releases it in `teardown`; one engine per settings
serves them all (Beam runs a DoFn instance per bundle-processing thread, and
re-creates them). The engine is closed once nobody has held it for
`idle_s`, not at the last release itself, because Beam releases often and
comes straight back:

- the bundle-based DirectRunner sets a DoFn up and tears it down around
  every bundle (apache_beam/runners/direct/transform_evaluator.py
  `_ParDoEvaluator.finish_bundle`);
- the SDK harness discards the DoFns of a failed bundle and builds new ones
  for its retry, and tears down those idle for 60 s
  (apache_beam/runners/worker/sdk_worker.py `BundleProcessorCache.discard`,
  `_schedule_periodic_shutdown`);
- the local runner tears everything down at the end of a run, and a process
  may run several (tests, benchmarks: apache_beam/runners/portability/
  fn_api_runner/fn_runner.py `run_stages` → `close_all`).

Reloading costs seconds on CPU and an XLA compile on TPU; an engine nobody
has needed for a minute gives its memory (on CPU a KV cache sized to the
machine) back to the rest of the job.

`build_engine` decides what an engine is (this process's own vLLM engine or a
client of the host's shared engine core); tests give a registry their own
factory (`engine.fake.FakeEngine`).
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
from typing import Callable, Optional

from engine.api import Engine, EngineSettings
from engine.host_client import HostEngineClient
from engine.local import VisionEngine, own_engine

_LOG = logging.getLogger(__name__)

# How long an engine nobody holds is kept for the next holder (see the module docstring).
IDLE_S = 60.0


@dataclasses.dataclass
class _Entry:
    key: str
    engine: Engine
    holders: int = 0
    releases: int = 0  # times holders fell to 0: an idle timer closes the engine only if none came since


class EngineRegistry:
    """One engine per settings, built by `factory`, shared by reference count (see the module docstring)."""

    def __init__(self, factory: Callable[[EngineSettings], Engine], idle_s: Optional[float] = IDLE_S):
        self._factory = factory
        self.idle_s = idle_s  # how long an engine nobody holds is kept; None: while the process lives
        # Held while an engine is built or closed: never two of this registry's engines starting or
        # stopping at once (on CPU each sizes its KV cache to the machine's memory).
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    @property
    def live(self) -> int:
        """How many engines this registry holds (built, not closed)."""
        return len(self._entries)

    def acquire(self, settings: EngineSettings) -> Engine:
        """The live engine for `settings`, built if there is none; closes a failed one it replaces. Pair with `release`."""
        key = settings.key()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.engine.failed:
                # Its holders see it failed and acquire again; their later release finds it gone.
                del self._entries[key]
                _close(entry.engine)
                entry = None
            if entry is None:
                entry = self._entries[key] = _Entry(key, self._factory(settings))
            entry.holders += 1
            return entry.engine

    def release(self, engine: Engine) -> None:
        """Give back an engine from `acquire`; the last holder's release closes it (a failed one at once, else after `idle_s`)."""
        with self._lock:
            entry = next((entry for entry in self._entries.values() if entry.engine is engine), None)
            if entry is None:  # replaced since (it had failed) and closed then
                return
            entry.holders -= 1
            if entry.holders:
                return
            entry.releases += 1
            if entry.engine.failed or self.idle_s == 0:
                del self._entries[entry.key]
                _close(entry.engine)
                return
            if self.idle_s is None:
                return
        timer = threading.Timer(self.idle_s, self._close_idle, args=(entry, entry.releases))
        timer.daemon = True  # an engine still idle when the process exits goes with it
        timer.start()

    def _close_idle(self, entry: _Entry, releases: int) -> None:
        with self._lock:
            if self._entries.get(entry.key) is entry and entry.holders == 0 and entry.releases == releases:
                del self._entries[entry.key]
                _close(entry.engine)

    def close_idle(self) -> None:
        """Close every engine nobody holds now (at interpreter exit: see ENGINES below)."""
        with self._lock:
            idle = [entry for entry in self._entries.values() if entry.holders == 0]
            for entry in idle:
                del self._entries[entry.key]
                _close(entry.engine)

    def stop_all(self, reason: str) -> None:
        """Stop every engine (see `Engine.stop`: the run was interrupted); a later acquire builds a new one."""
        # Without the lock: acquire holds it while an engine starts (seconds), and a stop must not wait.
        for entry in list(self._entries.values()):
            entry.engine.stop(reason)


def _close(engine: Engine) -> None:
    try:
        engine.close()
    except Exception:  # noqa: BLE001 - a broken engine that cannot even shut down must not block its replacement
        _LOG.exception("closing an engine failed")


def build_engine(settings: EngineSettings) -> VisionEngine:
    """This process's vLLM engine for `settings`: its own, or with `host_feeders` > 1 a client of the host's shared engine core."""
    return VisionEngine(settings, _host_client if settings.host_feeders > 1 else own_engine)


def _host_client(settings: EngineSettings, local_model: str) -> tuple[HostEngineClient, Callable[[], None]]:
    client = HostEngineClient(settings, local_model)
    return client, client.shutdown  # detaches this process; the host's core serves the others on


# The engines of this process.
ENGINES = EngineRegistry(build_engine)
# An engine released by its last holder waits idle_s for the next one on a daemon timer, which dies with the
# process: at a normal exit (the SDK harness tearing its DoFns down, a local run's end) the registry closes it
# instead, so its engine core is shut down and its compile cache saved (engine.compile_cache), not cut off.
atexit.register(ENGINES.close_idle)


def process_engines() -> EngineRegistry:
    """`ENGINES`: what a DoFn names to reach its worker process's registry (a function pickles by name; a registry holds
    threads and engines)."""
    return ENGINES
