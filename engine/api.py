"""The engine contract: what a stage hands an engine and what it gets back. No vLLM here.

`Engine` is all `transforms.run_tasks` needs of an engine: submit one image's
requests as one group and get a future per request, ask whether the engine
failed, stop it, close it. `engine.local.VisionEngine` (this process's vLLM
engine, or a client of the host's shared engine core) implements it;
tests script one (`engine.fake.FakeEngine`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
from typing import Any, Mapping, NamedTuple, Optional, Protocol, Sequence

from PIL import Image

from engine.prompts import Sampling


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What a constrained answer may be: exactly one of a JSON Schema, a list of choices, a regular expression.

    Mapped to vLLM's `StructuredOutputsParams(json=..., choice=..., regex=...)`
    (vllm/sampling_params.py); engines without structured output ignore it
    and the task's parser checks the answer instead.
    """

    json_schema: Optional[Mapping[str, Any]] = None
    choice: Optional[tuple[str, ...]] = None
    regex: Optional[str] = None

    def __post_init__(self) -> None:
        if sum(value is not None for value in (self.json_schema, self.choice, self.regex)) != 1:
            raise ValueError("a Constraint is exactly one of json_schema, choice, regex")


# How long an engine may take to become ready, by default (--engine_start_timeout_s): vLLM's own wait for a
# starting core is 600 s (VLLM_ENGINE_READY_TIMEOUT_S, vllm/envs.py), but an uncached XLA compile of 26B-A4B/31B
# takes tens of minutes (AI-Hypercomputer/tpu-recipes inference/ironwood/vLLM/Gemma4/gemma4-server.yaml sets
# that wait to 1800 s); twice the recipe's value leaves room for loading 60+ GB of weights from local disk.
START_TIMEOUT_S = 3600.0


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Everything needed to build the engine and its requests (resolved from a profile + options)."""

    model_path: str  # Hugging Face-format checkpoint: local directory or gs:// URI (staged once per worker)
    engine_args: Mapping[str, Any]  # passed to vllm.EngineArgs
    max_in_flight: int  # back-pressure: requests admitted but not finished, per process
    structured_output: bool  # constrain answers with their kind's Constraint (tasks.kinds; not available on TPU)
    vision_tokens: Optional[int] = None  # the job's image soft-token budget (tasks may set their own); None = model default
    xla_cache_path: Optional[str] = None  # persistent XLA compile cache (TPU), exported as VLLM_XLA_CACHE_PATH
    image_first: bool = True  # False only for the benchmark ablation
    thinking: bool = False  # Gemma 4 thinking mode: passed to the chat template as enable_thinking
    # Where images are preprocessed: on the step-loop thread before add_request, or on the submitting
    # (Beam) threads while the engine steps. The reason for each profile's choice is in engine/profiles.py.
    preprocess_on_step_thread: bool = False
    # vLLM's engine core (scheduler, KV cache manager, model runner) in its own process (V1
    # multiprocessing) instead of in this one. The reason for each profile's choice is in engine/profiles.py.
    engine_core_process: bool = False
    # Worker processes of one host that feed ONE engine core (engine.host): 1 = this
    # process's own engine, as placed by engine_core_process. The reason for each profile's value is
    # in engine/profiles.py.
    host_feeders: int = 1
    # Process environment the engine's native libraries read when they start (set before the engine
    # is built; a variable the user already exported wins). Reasons are in engine/profiles.py.
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)
    seed: int = 0
    # How long an engine may take to become ready (staging excluded) before its start fails naming what it
    # waited for (--engine_start_timeout_s; the default's reason is at START_TIMEOUT_S).
    start_timeout_s: float = START_TIMEOUT_S
    # The warm-up job (launch.submit --warmup): an engine start that leaves the persistent compile cache
    # (xla_cache_path) empty fails, instead of a job that succeeded and saved no compile (engine.compile_cache).
    xla_cache_required: bool = False
    # Ask for the sampled tokens' log-probabilities (the `confidence` column). False only for the
    # benchmark that measures what asking costs (BENCHMARKS.md, "Confidence").
    logprobs: bool = True

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """One task of one image as the engine runs it (built by `tasks.task.Task.request`)."""

    instruction: str  # the task's instruction for this item (placeholders filled)
    max_tokens: int
    sampling: Sampling
    constraint: Optional[Constraint] = None  # what decoding may produce, where the engine supports it
    vision_tokens: Optional[int] = None  # image soft-token budget; None = the model's default


@dataclasses.dataclass(frozen=True)
class EngineResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    latency_s: float
    # The sum of the generated tokens' log-probabilities (vLLM's cumulative_logprob, asked for with
    # SamplingParams(logprobs=0)); None when the engine returned none. tasks.quality.confidence reads it.
    logprob_sum: Optional[float] = None
    # The generated tokens in order, each as vLLM decoded it alone (FlatLogprobs.decoded_tokens, byte-fallback
    # pieces of one character mended: vllm/v1/engine/logprobs.py) with its sampled log-probability; joined,
    # they spell `text` (and a stop token after it). None when no log-probabilities were asked for.
    # tasks.quality.field_confidence reads it for a json answer's per-field confidence.
    tokens: Optional[tuple[tuple[str, float], ...]] = None
    # Prompt tokens shared with the first request of its prefix group (same image, same budget: what it could
    # take from the prefix cache); 0 for that first request and for a request alone.
    shared_prefix_tokens: int = 0


class Preprocessing(NamedTuple):
    """How much image preprocessing the requests so far needed."""

    requests: int  # requests rendered (prompt tokenized, image preprocessed or taken from the cache)
    images: int  # images preprocessed for them: one per image when its tasks share it


class EngineDeadError(RuntimeError):
    """The engine itself failed; outstanding work must be retried elsewhere."""


class EngineStartFailed(RuntimeError):
    """The engine did not start; the message names the cause in one line (its output's last error)."""


class EngineStartTimeout(EngineStartFailed):
    """The engine did not become ready within `EngineSettings.start_timeout_s`; the message names what it waited for."""


class EngineStopped(EngineDeadError):
    """The engine was stopped (the run was interrupted): outstanding work is cancelled, not failed."""


class Engine(Protocol):
    """One engine as a stage uses it; whoever built it closes it (`engine.registry`)."""

    def submit(self, image: Image.Image, image_key: str, requests: Sequence[EngineRequest]) -> list[concurrent.futures.Future]:
        """Queue one image's requests as one group; blocks while the engine is full. One future per request."""

    def prompt_for(self, instruction: str) -> str:
        """The prompt text a request with this instruction is given (for error rows and logs)."""

    @property
    def failed(self) -> bool:
        """The engine itself failed: every outstanding and later request fails with EngineDeadError."""

    def preprocessing(self) -> Preprocessing:
        """How much image preprocessing the requests so far needed."""

    def stop(self, reason: str) -> None:
        """Cancel outstanding work (an interrupted run): futures fail with EngineStopped."""

    def close(self) -> None:
        """Release the engine and everything it holds."""
