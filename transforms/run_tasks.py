"""Engine stage (Beam side): submit every task of an item to the process's engine, settle the answers.

`RunTasks` submits all tasks of one image together, in one admission
(`engine.api.Engine.submit`), so the first request computes the
image prefix and the others hit it in the prefix cache. It emits completions
as they finish and drains its own outstanding requests at the end of the
bundle, so a bundle commits only after all its requests are answered. A
request the engine rejects becomes an `engine` error row for that task only;
an engine failure (`EngineDeadError`) fails the bundle, which the runner
retries on a fresh engine. The engine comes from the worker process's
registry (`engine.registry`): acquired at the first item, released in `teardown`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from engine.api import Engine, EngineDeadError, EngineRequest, EngineResult, EngineSettings
from engine.registry import EngineRegistry, process_engines
from library import metrics
from library.errors import task_failure
from library.metadata import ItemValues, PromptError
from library.progress import PROGRESS
from schemas.records import ImageItem, Stage, TaskCompletion
from tasks.quality import DEGENERATE_FLAGS, confidence, field_confidence
from tasks.task import Task, TaskFingerprints
from tasks.text_layer import ANCHOR, MODEL
from transforms.text_layer import anchored_request, with_agreement


@dataclasses.dataclass
class _Pending:
    item: ImageItem  # kept until the task settles: a retry needs the pixels again
    values: ItemValues  # the item's metadata values: retry rungs fill their own instructions
    task: Task
    fingerprint: str
    attempt: int  # 0-based: 0 is the first request, n the n-th retry rung
    request: EngineRequest
    future: concurrent.futures.Future
    at: WindowedValue  # the item's window and timestamp: outputs made in finish_bundle must carry them


def image_key(item: ImageItem) -> str:
    """Source content hash + decoded size: decoding is deterministic, so this names the pixels."""
    return f"{item.info.content_hash}:{item.image.width}x{item.image.height}"


def needs_retry(task: Task, completion: TaskCompletion, max_retries: Optional[int] = None) -> bool:
    """An answer (read: `Task.read`) that failed its task's validation, or a degenerate prose answer
    (`tasks.quality`: truncated, looped, empty), with retry rungs left: the task's ladder, cut to
    `max_retries` rungs when given (`--max_retries`)."""
    degenerate = task.output.prose and any(flag in DEGENERATE_FLAGS for flag in completion.quality_flags)
    rungs = len(task.retries) if max_retries is None else min(len(task.retries), max_retries)
    return (completion.parse_error is not None or degenerate) and completion.attempts <= rungs


class RunTasks(beam.DoFn):
    """ImageItem -> TaskCompletion per task (main) or ErrorRecord (`errors`).

    Each task's instruction is filled from the item's metadata; a task whose
    values the item lacks gets a `prompt` error row, the others run. A blank
    page (`ItemInfo.blank`, found by the decode stage) gets each task's empty
    answer (`Task.blank`) here, without an engine request. Answers
    that fail their task's validation are re-asked along the task's bounded
    retry ladder (`tasks.task`) while the image is still at hand and
    its prefix still cached; the last answer goes to the parse stage either
    way, read once here and carried on the completion (`parsed` or
    `parse_error`), and the parse stage records a failed one as an error with the raw text.
    """

    def __init__(
        self, settings: EngineSettings, tasks: Sequence[Task], progress_interval_s: float = 30.0,
        engines: Callable[[], EngineRegistry] = process_engines, max_retries: Optional[int] = None,
    ):
        """`engines` names the worker process's engine registry (called in `setup`, in the worker);
        `max_retries` cuts every task's retry ladder to that many rungs (`--max_retries`; None: whole)."""
        self._settings = settings
        self._max_retries = max_retries
        self._engines_of = engines
        self._tasks = {task.name: task for task in tasks}
        self._fingerprints = TaskFingerprints(tasks, settings)
        self._progress_interval_s = progress_interval_s
        self._engines: Optional[EngineRegistry] = None
        self._engine: Optional[Engine] = None
        self._pending: list[_Pending] = []

    def setup(self) -> None:
        self._engines = self._engines_of()
        PROGRESS.tasks_per_item = len(self._tasks)
        PROGRESS.start_reporting(self._progress_interval_s)

    def start_bundle(self) -> None:
        self._pending = []
        assert self._engines is not None
        if self._engine is not None and self._engine.failed:
            # A retried bundle after an engine failure gets a fresh engine.
            self._engines.release(self._engine)
            self._engine = None

    def process(
        self, item: ImageItem, window: Any = beam.DoFn.WindowParam, timestamp: Any = beam.DoFn.TimestampParam
    ) -> Iterator[Any]:
        at = WindowedValue(None, timestamp, [window])
        values = ItemValues(item.info.metadata)
        planned = []
        for task in [self._tasks[name] for name in item.tasks] if item.tasks else self._tasks.values():
            fingerprint = self._fingerprints.of(task.name, values, ANCHOR if task.name in item.anchored else MODEL)
            try:
                request = anchored_request(item, task, values)
            except PromptError as exc:  # the item lacks a value this task's instruction names
                metrics.count("tasks_done")
                yield task_failure(item.info, task.name, Stage.PROMPT, exc, task_fingerprint=fingerprint)
                continue
            if item.info.blank:  # answered here: no engine request for a blank page
                metrics.count("tasks_done")
                yield task.blank(item.info, request.instruction, fingerprint)
                continue
            planned.append(_Pending(item, values, task, fingerprint, 0, request, concurrent.futures.Future(), at))
        if planned:
            if self._engine is None:
                # At the first request, not in setup: a worker whose pages their text layers answer
                # (--text_layer auto), or that are blank, never starts an engine.
                assert self._engines is not None
                self._engine = self._engines.acquire(self._settings)
            futures = self._engine.submit(item.image, image_key(item), [pending.request for pending in planned])
            metrics.count("tasks_submitted", len(futures))
            for pending, future in zip(planned, futures):
                self._pending.append(dataclasses.replace(pending, future=future))
        yield from self._emit(wait=False)

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._emit(wait=True)

    def teardown(self) -> None:
        if self._engines is not None and self._engine is not None:
            self._engines.release(self._engine)
            self._engine = None

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

    def _room(self, prompt_tokens: int) -> Optional[int]:
        """Output tokens the context leaves after a prompt, when the engine's max_model_len is known."""
        context = self._settings.engine_args.get("max_model_len")
        return None if context is None else max(0, int(context) - prompt_tokens)

    def _settle(self, pending: _Pending) -> Any:
        """The output for a finished request, or None when it was resubmitted on the retry ladder."""
        info = pending.item.info
        try:
            result: EngineResult = pending.future.result()
        except EngineDeadError:
            raise  # not this element's fault: fail the bundle so the runner retries it
        except Exception as exc:  # noqa: BLE001 - the engine rejected this request only
            metrics.count("tasks_done")
            return task_failure(
                info, pending.task.name, Stage.ENGINE, exc, pending.at, attempts=pending.attempt + 1,
                instruction=pending.request.instruction, task_fingerprint=pending.fingerprint,
            )
        metrics.count("prompt_tokens", result.prompt_tokens)
        metrics.count("generated_tokens", result.generated_tokens)
        metrics.count("cached_tokens", result.cached_tokens)
        metrics.record("request_latency_ms", result.latency_s * 1000.0)
        # Read once, here: the retry decision needs the parse, and the parse stage takes it from the completion.
        completion = pending.task.read(TaskCompletion(
            info=info,
            task=pending.task.name,
            text=result.text,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            generated_tokens=result.generated_tokens,
            cached_tokens=result.cached_tokens,
            shared_prefix_tokens=result.shared_prefix_tokens,
            latency_s=result.latency_s,
            confidence=confidence(result.logprob_sum, result.generated_tokens),
            attempts=pending.attempt + 1,
            instruction=pending.request.instruction,
            task_fingerprint=pending.fingerprint,
        ))
        if needs_retry(pending.task, completion, self._max_retries):
            assert self._engine is not None
            attempt = pending.attempt + 1
            # A rung names no value the task's instruction does not (Task checks): the first attempt found them all.
            # The retry goes out now, while the image's prefix is still in the prefix cache (the first
            # attempt's blocks are freed to the cache's LRU queue only when it finishes, moments ago).
            request = anchored_request(pending.item, pending.task, pending.values, attempt, self._room(result.prompt_tokens))
            metrics.count(f"retries_{pending.task.name}")
            [future] = self._engine.submit(pending.item.image, image_key(pending.item), [request])
            self._pending.append(dataclasses.replace(pending, attempt=attempt, request=request, future=future))
            return None
        metrics.count("tasks_done")
        if completion.parsed is not None and completion.parsed.data is not None:
            completion = dataclasses.replace(
                completion, field_confidence=field_confidence(result.tokens, result.text, completion.parsed.data),
            )
        return pending.at.with_value(with_agreement(pending.task, completion))
