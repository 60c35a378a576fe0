"""Engine stage (Beam side): submit every task of an item to the process's engine, settle the answers.

`RunTasks` submits all tasks of one image together, in one admission
(`transforms.engine.VisionEngine.submit`), so the first request computes the
image prefix and the others hit it in the prefix cache. It emits completions
as they finish and drains its own outstanding requests at the end of the
bundle, so a bundle commits only after all its requests are answered. A
request the engine rejects becomes an `engine` error row for that task only;
an engine failure (`EngineDeadError`) fails the bundle, which the runner
retries on a fresh engine.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from schemas.records import ImageItem, Stage, TaskCompletion
from transforms import metrics
from transforms.engine import ENGINES, EngineDeadError, EngineResult, EngineSettings, VisionEngine
from transforms.errors import task_failure
from transforms.parse import DetectionParseError, parse_detections, split_answer
from transforms.progress import PROGRESS
from transforms.prompts import TaskSpec


@dataclasses.dataclass
class _Pending:
    item: ImageItem  # kept until the task settles: a retry needs the pixels again
    spec: TaskSpec  # the task as configured (retry rungs are applied to it)
    attempt: int  # 0-based: 0 is the first request, n the n-th retry rung
    future: concurrent.futures.Future
    at: WindowedValue  # the item's window and timestamp: outputs made in finish_bundle must carry them


def image_key(item: ImageItem) -> str:
    """Source content hash + decoded size: decoding is deterministic, so this names the pixels."""
    return f"{item.info.content_hash}:{item.image.width}x{item.image.height}"


def needs_retry(spec: TaskSpec, attempt: int, result: EngineResult, width: int, height: int) -> bool:
    """A box-producing task whose answer does not parse, with retry rungs left."""
    if not spec.produces_boxes or attempt >= len(spec.retries):
        return False
    try:
        parse_detections(split_answer(result.text).text, width, height, truncated=result.finish_reason == "length")
    except DetectionParseError:
        return True
    return False


class RunTasks(beam.DoFn):
    """ImageItem -> TaskCompletion per task (main) or ErrorRecord (`errors`).

    Detection answers that fail validation are re-asked along the task's
    bounded retry ladder (transforms/prompts.py) while the image is still
    at hand and its prefix still cached; the last answer goes to the parse
    stage either way, which records it as an error with the raw text.
    """

    def __init__(self, settings: EngineSettings, specs: Sequence[TaskSpec], progress_interval_s: float = 30.0):
        self._settings = settings
        self._specs = {spec.name: spec for spec in specs}
        self._progress_interval_s = progress_interval_s
        self._engine: Optional[VisionEngine] = None
        self._pending: list[_Pending] = []

    def setup(self) -> None:
        self._engine = ENGINES.acquire(self._settings)
        PROGRESS.tasks_per_item = len(self._specs)
        PROGRESS.start_reporting(self._progress_interval_s)

    def start_bundle(self) -> None:
        self._pending = []
        if self._engine is None or self._engine.failed:
            # A retried bundle after an engine failure gets a fresh engine.
            self._engine = ENGINES.acquire(self._settings)

    def process(
        self, item: ImageItem, window: Any = beam.DoFn.WindowParam, timestamp: Any = beam.DoFn.TimestampParam
    ) -> Iterator[Any]:
        assert self._engine is not None
        specs = [self._specs[name] for name in item.tasks] if item.tasks else list(self._specs.values())
        futures = self._engine.submit(item.image, image_key(item), specs)
        metrics.count("tasks_submitted", len(futures))
        at = WindowedValue(None, timestamp, [window])
        for spec, future in zip(specs, futures):
            self._pending.append(_Pending(item, spec, 0, future, at))
        yield from self._emit(wait=False)

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._emit(wait=True)

    def _emit(self, wait: bool) -> Iterator[Any]:
        """Settle finished requests; with `wait`, until none is left (retries included)."""
        while self._pending:
            done = [pending for pending in self._pending if pending.future.done()]
            if not done:
                if not wait:
                    return
                concurrent.futures.wait([p.future for p in self._pending], return_when=concurrent.futures.FIRST_COMPLETED)
                continue
            for pending in done:
                self._pending.remove(pending)
                output = self._settle(pending)
                if output is not None:
                    yield output

    def _settle(self, pending: _Pending) -> Any:
        """The output for a finished request, or None when it was resubmitted on the retry ladder."""
        info = pending.item.info
        try:
            result: EngineResult = pending.future.result()
        except EngineDeadError:
            raise  # not this element's fault: fail the bundle so the runner retries it
        except Exception as exc:  # noqa: BLE001 - the engine rejected this request only
            metrics.count("tasks_done")
            return task_failure(info, pending.spec.name, Stage.ENGINE, exc, pending.at, attempts=pending.attempt + 1)
        metrics.count("prompt_tokens", result.prompt_tokens)
        metrics.count("generated_tokens", result.generated_tokens)
        metrics.count("cached_tokens", result.cached_tokens)
        metrics.record("request_latency_ms", result.latency_s * 1000.0)
        if needs_retry(pending.spec, pending.attempt, result, info.width, info.height):
            assert self._engine is not None
            rung = pending.spec.retries[pending.attempt]
            metrics.count(f"retries_{pending.spec.name}")
            [future] = self._engine.submit(pending.item.image, image_key(pending.item), [rung.apply(pending.spec)])
            self._pending.append(dataclasses.replace(pending, attempt=pending.attempt + 1, future=future))
            return None
        metrics.count("tasks_done")
        completion = TaskCompletion(
            info=info,
            task=pending.spec.name,
            text=result.text,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            generated_tokens=result.generated_tokens,
            cached_tokens=result.cached_tokens,
            latency_s=result.latency_s,
            attempts=pending.attempt + 1,
        )
        return pending.at.with_value(completion)
