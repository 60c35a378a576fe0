"""Every use of vLLM beyond its documented API, in one place, as read from vLLM 0.32.0.

`engine.local`, `engine.host` and `engine.host_client` need a few things
vLLM's public API (`LLMEngine`, `AsyncLLM`, `EngineArgs`, `SamplingParams`)
does not offer: the renderer `vllm.LLM.generate` renders through, the
engine-core launcher `vllm serve --api-server-count N` uses, and the
engine-core client's process handles. They are reached only through the
functions below. `USED` names each class attribute, method, parameter or
function they touch and the file of the installed `vllm` package it was read
from; tests/test_vllm_internals.py checks every entry against the installed
vLLM's source (without importing it), so an upgrade that moves one fails
there, in the fast tier, and not in a worker.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, AsyncIterator, Mapping, Sequence

READ_FROM = "0.32.0"

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Internal:
    """One name the functions below rely on: `owner` ("Class", "Class.method" or "function") in `path` has `name`
    (a class attribute, method or `self.` attribute of the class; a parameter of the function)."""

    path: str  # relative to the installed vllm package
    owner: str
    name: str


USED: tuple[Internal, ...] = (
    # api_server_args
    Internal("engine/arg_utils.py", "EngineArgs", "_api_process_count"),
    Internal("engine/arg_utils.py", "EngineArgs", "_api_process_rank"),
    # render, processor_only_cache
    Internal("renderers/inputs/preprocess.py", "parse_model_prompt", "model_config"),
    Internal("renderers/base.py", "BaseRenderer", "render_cmpl"),
    Internal("renderers/base.py", "BaseRenderer.render_cmpl", "skip_mm_cache"),
    Internal("renderers/base.py", "BaseRenderer", "default_cmpl_tok_params"),
    Internal("renderers/base.py", "BaseRenderer", "_mm_processor_only_cache"),
    # core_processes, wake_steps_on_core_exit
    Internal("v1/engine/llm_engine.py", "LLMEngine", "engine_core"),
    Internal("v1/engine/core_client.py", "MPClient", "resources"),
    Internal("v1/engine/core_client.py", "BackgroundResources", "engine_manager"),
    Internal("v1/engine/utils.py", "CoreEngineProcManager", "processes"),
    Internal("v1/engine/core_client.py", "SyncMPClient", "outputs_queue"),
    Internal("v1/engine/core_client.py", "MPClient", "utility_results"),
    # launch_engine_core
    Internal("v1/engine/utils.py", "launch_core_engines", "addresses"),
    Internal("v1/engine/utils.py", "EngineZmqAddresses", "inputs"),
    Internal("v1/engine/utils.py", "EngineZmqAddresses", "outputs"),
    Internal("v1/engine/utils.py", "CoreEngineLaunch", "engine_manager"),
    Internal("v1/engine/utils.py", "CoreEngineProcManager", "shutdown"),
    # add_request, first_and_final_outputs
    Internal("v1/engine/async_llm.py", "AsyncLLM", "add_request"),
    Internal("v1/engine/output_processor.py", "RequestOutputCollector", "get"),
    Internal("v1/engine/output_processor.py", "RequestOutputCollector", "get_nowait"),
    # client_input_socket, abort_in_core, abort_unknown_requests
    Internal("v1/engine/async_llm.py", "AsyncLLM", "engine_core"),
    Internal("v1/engine/core_client.py", "MPClient", "input_socket"),
    Internal("v1/engine/async_llm.py", "AsyncLLM", "output_processor"),
    Internal("v1/engine/output_processor.py", "OutputProcessor", "request_states"),
    Internal("v1/engine/core_client.py", "AsyncMPClient", "get_output_async"),
    Internal("v1/engine/core_client.py", "AsyncMPClient", "abort_requests_async"),
)


def api_server_args(engine_args: Any, count: int, rank: int) -> None:
    """Make `vllm.EngineArgs` those of front end `rank` of `count` (-1: the engine core they share).

    What `vllm serve --api-server-count N` sets (vllm/entrypoints/cli/serve.py;
    the fields: vllm/engine/arg_utils.py `EngineArgs`): with more than one
    front end vLLM keeps the multimodal processor cache in each front end only
    ("processor_only", vllm/multimodal/cache/factories.py), which is what
    `render` renders through.
    """
    engine_args._api_process_count = count
    engine_args._api_process_rank = rank


def render(renderer: Any, model_config: Any, prompt: Mapping[str, Any]) -> Any:
    """vLLM's engine input for one prompt dict: the calls `vllm.LLM.generate` makes before `add_request`.

    `skip_mm_cache=True` renders through the renderer's processor-only cache
    (vllm/renderers/base.py `BaseRenderer.render_cmpl`), which keeps the
    processed image in this process and sends it in full with every request.
    Not thread-safe: the caller serializes.
    """
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    (engine_input,) = renderer.render_cmpl(
        [parse_model_prompt(model_config, dict(prompt))], renderer.default_cmpl_tok_params, skip_mm_cache=True
    )
    return engine_input


def processor_only_cache(renderer: Any) -> Any:
    """The cache `render` renders through (`make_stats()`: hits and total), None when the profile disables it.

    vLLM 0.32 has no accessor for it: the public `mm_processor_cache` is the
    sender cache (vllm/renderers/base.py `BaseRenderer.__init__`).
    """
    return renderer._mm_processor_only_cache


def core_processes(llm_engine: Any) -> Sequence[Any]:
    """The engine-core processes (`multiprocessing` processes) of an `LLMEngine` whose core runs in its own process."""
    return llm_engine.engine_core.resources.engine_manager.processes


def wake_steps_on_core_exit(llm_engine: Any) -> None:
    """Block until an engine-core process of `llm_engine` exits, then wake whatever waits for it with vLLM's EngineDeadError.

    vLLM 0.32 notices the process's exit (its client is marked dead and later
    calls raise EngineDeadError) but never wakes a `step()` already waiting
    for outputs (`SyncMPClient.get_output` blocks on `outputs_queue`,
    vllm/v1/engine/core_client.py): the step loop, and every Beam thread
    waiting on it, would wait forever. Run on a thread of its own.
    """
    from multiprocessing.connection import wait

    from vllm.v1.engine.exceptions import EngineDeadError

    client = llm_engine.engine_core
    wait([process.sentinel for process in core_processes(llm_engine)])
    client.outputs_queue.put_nowait(EngineDeadError())
    # A utility call waiting for the dead core (SyncMPClient.call_utility) would wait forever too.
    for future in list(client.utility_results.values()):
        if not future.done():
            future.set_exception(EngineDeadError())


def launch_engine_core(vllm_config: Any, inputs: Sequence[str], outputs: Sequence[str]) -> Any:
    """Start an engine core for front ends that bind `inputs`/`outputs` (one ZMQ address pair each); return once it is ready.

    vLLM's own launcher for `vllm serve --api-server-count N`
    (vllm/v1/engine/utils.py `launch_core_engines`; leaving its block waits
    for the core's startup handshake). Returns its `CoreEngineProcManager`
    (`processes`, `shutdown(timeout)`).
    """
    from vllm.v1.engine.utils import EngineZmqAddresses, launch_core_engines
    from vllm.v1.executor import Executor

    addresses = EngineZmqAddresses(inputs=list(inputs), outputs=list(outputs))
    with launch_core_engines(vllm_config, Executor.get_class(vllm_config), False, addresses) as launch:
        pass
    return launch.engine_manager


async def add_request(async_llm: Any, request_id: str, prompt: Any, params: Any) -> Any:
    """Hand one rendered request to an `AsyncLLM`; raises at once for a request its front end rejects.

    Returns the request's output stream for `first_and_final_outputs`: `AsyncLLM.generate`
    (vllm/v1/engine/async_llm.py) does the same, but raises a rejection only
    once its caller starts reading outputs.
    """
    return await async_llm.add_request(request_id, prompt, params)


async def first_and_final_outputs(stream: Any) -> AsyncIterator[Any]:
    """The first `RequestOutput` of a stream from `add_request` and its finished one (once, when they are one),
    read as `AsyncLLM.generate` reads them.

    A request asking for outputs as they come (`RequestOutputKind.CUMULATIVE`)
    has a first output once its prefill is computed; a FINAL_ONLY request has
    only its finished one.
    """
    first = True
    while True:
        output = stream.get_nowait() or await stream.get()
        if first or output.finished:
            yield output
        first = False
        if output.finished:
            return


def client_input_socket(async_llm: Any) -> Any:
    """The ZMQ ROUTER socket an `AsyncLLM` attached to an external engine core sends its requests on (vllm/v1/engine/core_client.py `MPClient.__init__`)."""
    return async_llm.engine_core.input_socket


async def abort_in_core(async_llm: Any, request_ids: list[str]) -> None:
    """Send an abort for `request_ids` to the engine core as they are, known to this front end or not.

    `AsyncLLM.abort` first drops the ids its output processor does not know
    (vllm/v1/engine/async_llm.py); this goes to its engine-core client directly
    (vllm/v1/engine/core_client.py `AsyncMPClient.abort_requests_async`), and
    raises what sending raises.
    """
    await async_llm.engine_core.abort_requests_async(request_ids)


@dataclasses.dataclass
class StrayCount:
    """What `abort_unknown_requests` saw: outputs of requests this client never added, and requests it aborted."""

    outputs: int = 0
    aborted: set[str] = dataclasses.field(default_factory=set)  # request ids


def abort_unknown_requests(async_llm: Any, count: StrayCount) -> None:
    """Abort in the engine core every unfinished request whose output reaches `async_llm` but which it never added.

    On a client socket taken over from a dead client (engine.host), the core
    still sends that client's requests' outputs there. vLLM's `OutputProcessor`
    skips outputs of request ids it does not know (vllm/v1/engine/output_processor.py
    `process_outputs`: "Ignore output for already-aborted request"); this makes
    the core stop computing them too. Wraps the client's `get_output_async`,
    which AsyncLLM's output handler looks up on every iteration
    (vllm/v1/engine/async_llm.py `_run_output_handler`). A request this client
    adds is known before it is sent (`AsyncLLM._add_request` adds it to the
    output processor first); a late output of its own aborted request is aborted once more, which
    the scheduler ignores (vllm/v1/core/sched/scheduler.py `finish_requests`).
    """
    client = async_llm.engine_core
    known = async_llm.output_processor.request_states
    receive = client.get_output_async

    async def get_output_async() -> Any:
        outputs = await receive()
        strays = [output for output in outputs.outputs if output.request_id not in known]
        if strays:
            count.outputs += len(strays)
            running = [output.request_id for output in strays if not output.finished and output.request_id not in count.aborted]
            if running:
                count.aborted.update(running)
                _LOG.info("aborting %d request(s) of the dead client whose slot this process took over", len(running))
                try:
                    await client.abort_requests_async(running)
                except Exception as exc:  # noqa: BLE001 - they run to their end instead; this client's own work goes on
                    _LOG.warning("could not abort the dead client's requests %s: %r", running, exc)
        return outputs

    client.get_output_async = get_output_async
