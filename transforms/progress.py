"""A progress line per worker process at a fixed interval, not a log line per element.

Fed by the same counter calls as the Beam metrics (`transforms.metrics.count`),
so the line and the run summary never disagree on what a counter means.
Locally (one process) it covers the whole run; on Dataflow each worker
process reports its own share in the worker logs.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

_LOG = logging.getLogger("vision_batch.progress")
TRACKED = {"items_planned", "items", "tasks_done", "skipped_tasks"}


class Progress:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._errors = 0
        self._started: Optional[float] = None  # first counted event: rates exclude engine start-up
        self._reporter: Optional[threading.Thread] = None
        self.tasks_per_item = 1

    def add(self, name: str, amount: int) -> None:
        if name in TRACKED or name.startswith("errors_"):
            with self._lock:
                if self._started is None:
                    self._started = time.monotonic()
                if name.startswith("errors_"):
                    self._errors += amount
                else:
                    self._counts[name] = self._counts.get(name, 0) + amount

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
        """Log `line()` every `interval_s` seconds from a daemon thread (once per process; 0 = off)."""
        with self._lock:
            if self._reporter is not None or interval_s <= 0:
                return
            self._reporter = threading.Thread(target=self._report, args=(interval_s,), name="progress", daemon=True)
            self._reporter.start()

    def _report(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            _LOG.info(self.line())


PROGRESS = Progress()
