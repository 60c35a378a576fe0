"""What every variant reports, and how it is measured.

Pure functions (prefix reuse, throughput figures) are unit-tested in
tests/test_benchmarks_smoke.py; the samplers wrap a running engine or process.
"""
from __future__ import annotations

import dataclasses
import math
import os
import resource
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import psutil


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """One answered request: which image and task, and its token counts."""

    image: str  # image identity (item id or content hash)
    task: str
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int


@dataclasses.dataclass(frozen=True)
class PrefixReuse:
    """Prefix-cache reuse inside images, against what the prompt layout makes shareable."""

    reused_tokens: int  # cached tokens of every task but the first computed one of its image
    shareable_tokens: int  # per image: (tasks - 1) x shared-prefix length
    block_tokens: int  # cache granularity seen in the hits (gcd of all hit lengths; 0 if none)
    block_aligned_shareable: int  # the same, with each shared prefix rounded down to block_tokens

    @property
    def ratio(self) -> float:
        return self.reused_tokens / self.shareable_tokens if self.shareable_tokens else 0.0

    @property
    def ratio_of_block_aligned(self) -> float:
        return self.reused_tokens / self.block_aligned_shareable if self.block_aligned_shareable else 0.0


def prefix_reuse(records: Iterable[TaskRecord], suffix_tokens: Mapping[str, int]) -> PrefixReuse:
    """How much of each image's shareable prefix its later tasks took from the prefix cache.

    `suffix_tokens[task]` is the number of prompt tokens after the prefix all
    tasks share (system + image): it does not depend on the image, so an
    image's shared-prefix length is any of its tasks' prompt length minus that
    task's suffix (image token counts vary with aspect ratio). The first task
    an image computes can only hit other images' system-prompt blocks, so
    per image the task with the fewest cached tokens is not counted.
    """
    by_image: dict[str, list[TaskRecord]] = {}
    for record in records:
        by_image.setdefault(record.image, []).append(record)
    hits = [r.cached_tokens for rs in by_image.values() for r in rs if r.cached_tokens > 0]
    block = math.gcd(*hits) if hits else 0
    reused = shareable = aligned = 0
    for tasks in by_image.values():
        shared = tasks[0].prompt_tokens - suffix_tokens[tasks[0].task]
        cached = sorted(r.cached_tokens for r in tasks)
        reused += sum(cached[1:])
        shareable += (len(tasks) - 1) * shared
        aligned += (len(tasks) - 1) * (shared // block * block if block else shared)
    return PrefixReuse(reused, shareable, block, aligned)


@dataclasses.dataclass
class VariantResult:
    """The measured figures of one variant over one run of the workload."""

    name: str
    items: int
    tasks: int  # answered requests (results + per-task errors)
    wall_s: float  # the measured window (engine load and server start-up excluded)
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    busy_s: Optional[float]  # time the engine had work (see BENCHMARKS.md for each variant's definition)
    peak_rss_bytes: int
    cpu_s: Optional[float] = None  # CPU time of the variant's processes in the window (less load-sensitive than wall)
    reuse: Optional[PrefixReuse] = None
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        wall = max(self.wall_s, 1e-9)
        return {
            "items": self.items,
            "tasks": self.tasks,
            "wall_s": round(self.wall_s, 2),
            "items_per_s": round(self.items / wall, 4),
            "tasks_per_s": round(self.tasks / wall, 4),
            "prompt_tokens_per_s": round(self.prompt_tokens / wall, 1),
            "generated_tokens_per_s": round(self.generated_tokens / wall, 1),
            "prompt_tokens": self.prompt_tokens,
            "computed_prompt_tokens": self.prompt_tokens - self.cached_tokens,  # prefilled, not taken from the cache
            "generated_tokens": self.generated_tokens,
            "cached_tokens": self.cached_tokens,
            "prefix_reuse_ratio": round(self.reuse.ratio, 4) if self.reuse else None,
            "prefix_reuse_of_block_aligned": round(self.reuse.ratio_of_block_aligned, 4) if self.reuse else None,
            "prefix_block_tokens": self.reuse.block_tokens if self.reuse else None,
            "engine_busy_fraction": round(self.busy_s / wall, 4) if self.busy_s is not None else None,
            "peak_rss_mib": round(self.peak_rss_bytes / 2**20, 1),
            "cpu_s_per_task": round(self.cpu_s / self.tasks, 3) if self.cpu_s is not None and self.tasks else None,
            **self.notes,
        }


def from_records(
    name: str, items: int, records: Sequence[TaskRecord], suffix_tokens: Optional[Mapping[str, int]], **kwargs: Any
) -> VariantResult:
    """A VariantResult whose token totals and prefix reuse come from per-request records."""
    return VariantResult(
        name=name,
        items=items,
        tasks=len(records),
        prompt_tokens=sum(r.prompt_tokens for r in records),
        generated_tokens=sum(r.generated_tokens for r in records),
        cached_tokens=sum(r.cached_tokens for r in records),
        reuse=prefix_reuse(records, suffix_tokens) if suffix_tokens else None,
        **kwargs,
    )


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


@dataclasses.dataclass(frozen=True)
class Window:
    """A measured window: wall time, and CPU time of this process (all threads) or of a process tree."""

    wall_s: float
    cpu_s: float


def process_cpu_seconds(pid: Optional[int] = None) -> float:
    """User + system CPU time of a process and its live descendants (default: this process)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def own_cpu_seconds() -> float:
    """User + system CPU time of this process alone (all its threads), not of its children."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def timed(call: Callable[[], Any], cpu_of: Callable[[], float] = process_cpu_seconds) -> tuple[Any, Window]:
    started, cpu_started = time.perf_counter(), cpu_of()
    value = call()
    return value, Window(time.perf_counter() - started, cpu_of() - cpu_started)


class StepTimer:
    """Wraps a `vllm.LLMEngine`'s `step()`: time inside it, and how full its sequence slots were.

    `seconds` is the time the engine had work and ran it. `occupancy` is
    time-weighted: per step, unfinished requests (capped at `slots`, the
    engine's max_num_seqs) over `slots`. A synchronous batch whose short
    tasks are done keeps stepping for its longest output with few of its
    slots used: busy, but at a fraction of the batch it could run.
    """

    def __init__(self, engine: Any, slots: int):
        self.seconds = 0.0
        self.steps = 0
        self.durations: list[float] = []  # of every step, in order
        self._slot_seconds = 0.0
        step: Callable[[], Any] = engine.step

        def timed_step() -> Any:
            used = min(engine.get_num_unfinished_requests(), slots) / slots
            started = time.perf_counter()
            try:
                return step()
            finally:
                elapsed = time.perf_counter() - started
                self.seconds += elapsed
                self.durations.append(elapsed)
                self._slot_seconds += elapsed * used
                self.steps += 1

        engine.step = timed_step

    @property
    def occupancy(self) -> float:
        return round(self._slot_seconds / self.seconds, 3) if self.seconds else 0.0


class CallTimer:
    """Time spent in some methods of an object, summed over calls (wrapped in place).

    `clock` is `time.perf_counter` for wall time, or `time.thread_time` for
    the CPU time of the calling thread (what a call costs the process's
    GIL-holding work, waits excluded). Uses: the model runner of an
    in-process engine (`execute_model`, `sample_tokens`: the rest of the
    engine's busy time is host work around the model, which stays on the
    host's CPU on an accelerator), and the engine's front end (inputs
    processed, requests sent to the core, outputs turned into text).
    """

    def __init__(self, methods: Sequence[tuple[Any, str]], clock: Callable[[], float] = time.perf_counter):
        self.seconds = 0.0
        self._clock = clock
        for target, name in methods:
            setattr(target, name, self._timed(getattr(target, name)))

    def _timed(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            started = self._clock()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds += self._clock() - started

        return timed_call


def own_peak_rss_bytes() -> int:
    """Peak resident set of this process over its life (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TreeRssSampler:
    """Samples the summed RSS of a process and its descendants; keeps the peak.

    For the server variant, whose engine lives in other processes, where
    ru_maxrss of this process would miss it.
    """

    def __init__(self, pid: int, interval_s: float = 0.25):
        self._root = psutil.Process(pid)
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> int:
        total = 0
        for process in [self._root, *self._root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_bytes = max(self.peak_bytes, self._sample())

    def __enter__(self) -> "TreeRssSampler":
        self.peak_bytes = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._sample())


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def load_average() -> float:
    with open("/proc/loadavg") as loadavg:
        return float(loadavg.read().split()[0])
