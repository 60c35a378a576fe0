"""A progress line per worker process at a fixed interval, not a log line per element.

Fed by the same counter calls as the Beam metrics (`library.metrics.count`),
so the line and the run summary never disagree on what a counter means.
Locally (one process) it covers the whole run; on Dataflow each worker
process reports its own share in the worker logs. The first line comes a
few seconds after the engine is up, so even a short run shows one.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

_LOG = logging.getLogger("vision_batch.progress")
TRACKED = {"items_planned", "items", "tasks_done", "skipped_tasks"}
FIRST_LINE_AFTER_S = 5.0


class Progress:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._errors = 0
        self._started: Optional[float] = None  # first counted event: rates exclude engine start-up
        self._reporter: Optional[threading.Thread] = None
        self._stopped = threading.Event()
        self.tasks_per_item = 1

    def reset(self) -> None:
        """Forget earlier counts and stop reporting: a new run in this process (local runs, tests)."""
        self.stop()
        with self._lock:
            self._counts, self._errors, self._started = {}, 0, None

    def stop(self) -> None:
        """No more progress lines (the run ended or was interrupted); start_reporting starts anew."""
        with self._lock:
            reporter, self._reporter = self._reporter, None
            self._stopped.set()
        if reporter is not None and reporter is not threading.current_thread():
            reporter.join(timeout=1.0)

    def add(self, name: str, amount: int) -> None:
        if name in TRACKED or name.startswith("errors_"):
            with self._lock:
                if self._started is None:
                    self._started = time.monotonic()
                if name.startswith("errors_"):
                    self._errors += amount
                else:
                    self._counts[name] = self._counts.get(name, 0) + amount

    @property
    def counted(self) -> bool:
        """Whether this process saw any work (not so in the launching process of a multi-process run)."""
        return self._started is not None

    def line(self) -> str:
        with self._lock:
            counts, errors, started = dict(self._counts), self._errors, self._started
        elapsed = max(time.monotonic() - (started or time.monotonic()), 1e-9)
        done = counts.get("tasks_done", 0)
        rate = done / elapsed
        text = f"progress: {counts.get('items', 0)} items decoded"
        planned = counts.get("items_planned", 0)
        if planned:
            text += f" of {planned} planned"
        text += f", {done} tasks done ({rate:.2f}/s), {errors} errors"
        remaining = planned * self.tasks_per_item - done - counts.get("skipped_tasks", 0)
        if planned and rate > 0 and remaining > 0:
            text += f", ETA {remaining / rate:.0f} s"
        return text

    def start_reporting(self, interval_s: float) -> None:
        """Log `line()` after a few seconds, then every `interval_s` seconds, from a daemon thread (0 = off)."""
        with self._lock:
            if self._reporter is not None or interval_s <= 0:
                return
            self._stopped = threading.Event()
            self._reporter = threading.Thread(
                target=self._report, args=(interval_s, self._stopped), name="progress", daemon=True
            )
            self._reporter.start()

    def _report(self, interval_s: float, stopped: threading.Event) -> None:
        delay = min(FIRST_LINE_AFTER_S, interval_s)
        while not stopped.wait(delay):
            _LOG.info(self.line())
            delay = interval_s


PROGRESS = Progress()
