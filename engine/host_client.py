"""A worker process's client of the host's shared engine core (`engine.host`).

`HostEngineClient` is vLLM's `AsyncLLM` attached to an engine core another
process started (`client_addresses`, `client_count`, `client_index`: the
front end `vllm serve --api-server-count N` runs in each API process),
behind the synchronous surface `engine.local.VisionEngine` drives an
`LLMEngine` through: `add_request` raises for a request the front end
rejects (that request's own error), `step` blocks until requests finish and
returns their `RequestOutput`s (and the first output of a request that streams
its outputs: a prefix group's leader, `engine.local.PrefixGroups`), and raises
`EngineDeadError` once the core is gone. So VisionEngine's submit/futures, back-pressure, per-request error
isolation and shared preprocessing work unchanged; only the engine behind
its step loop differs.

AsyncLLM runs on an asyncio loop in its own thread: its output handler
receives this client's outputs from the core and detokenizes them there
(this process's share of the host's front-end work).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import queue
import threading
import time
from typing import Any, Iterator, Optional

from engine import vllm_internals
from engine.api import EngineSettings
from engine.host import (
    MONITOR_INTERVAL_S, RECLAIM_TIMEOUT_S, HostEngineReclaimFailed, Slot, acquire_slot, client_engine_args, live_clients,
    output_tail,
)
from engine.output import cause_of, route_vllm_logging

_LOG = logging.getLogger(__name__)

# The request id a reclaiming client aborts to find out whether the core's socket is routable yet: no
# request has it (vLLM's own ids carry a random suffix: vllm/v1/engine/input_processor.py
# `assign_request_id`), and the scheduler ignores unknown ids (vllm/v1/core/sched/scheduler.py `finish_requests`).
_PROBE_REQUEST_ID = "vision-batch-reclaim-probe"


@contextlib.contextmanager
def _replayed_greeting(slot: Slot) -> Iterator[None]:
    """Greet a reclaiming client as the core greeted the slot's first client (`Slot.greeting`).

    A DEALER with the core's identity connects to the client's own input path (`Slot.client_addresses`)
    and sends the core's ready message there; ZeroMQ delivers it once the client's ROUTER binds
    (`MPClient.__init__` binds, then waits for it). Closed on leaving: the core takes the identity over.
    """
    import zmq

    identity, payload = slot.greeting()
    context = zmq.Context()
    greeter = context.socket(zmq.DEALER)
    greeter.setsockopt(zmq.IDENTITY, identity)
    try:
        greeter.connect(slot.client_addresses()["input_address"])
        greeter.send(payload)
        yield
    finally:
        greeter.close(linger=0)
        context.term()


class HostEngineClient:
    """This process's front end on the host's engine core (see the module docstring)."""

    def __init__(self, settings: EngineSettings, local_model: str):
        from vllm.usage.usage_lib import UsageContext

        self._slot: Slot = acquire_slot(settings, local_model)
        slot = self._slot
        self._finished: "queue.SimpleQueue[Any]" = queue.SimpleQueue()  # RequestOutput, or an exception: engine gone
        self._dead: Optional[BaseException] = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = threading.Event()
        self.strays = vllm_internals.StrayCount()  # on a reclaimed slot: the dead client's requests seen and aborted
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="host-engine-client", daemon=True)
        self._loop_thread.start()
        vllm_config = client_engine_args(settings, local_model, slot.state.slots, slot.index).create_engine_config(
            UsageContext.ENGINE_CONTEXT
        )
        try:
            self._llm = self._call(self._connect(vllm_config))
        except BaseException:
            slot.release()
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self.renderer = self._llm.renderer
        self.model_config = self._llm.model_config
        # The host's in-flight limit (host_feeders x the per-process share the settings carry) is shared by the
        # processes attached now, not by as many as --host_feeders says: fewer than planned get larger shares, and
        # a dead client's share returns to the others (until a new process reclaims its slot).
        self._host_in_flight = settings.max_in_flight * settings.host_feeders
        self.attached = max(1, live_clients(slot.state))
        threading.Thread(target=self._watch_core, name="host-engine-watch", daemon=True).start()

    async def _connect(self, vllm_config: Any) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.executor import Executor

        route_vllm_logging()

        def attach() -> Any:
            # Built on the loop so that its output handler starts on it. Waits for the core's greeting.
            return AsyncLLM(
                vllm_config,
                Executor.get_class(vllm_config),
                log_stats=False,
                log_requests=False,
                client_addresses=self._slot.client_addresses(),
                client_count=self._slot.state.slots,
                client_index=self._slot.index,
            )

        if not self._slot.reclaimed:
            return attach()
        with _replayed_greeting(self._slot):
            llm = attach()
        await self._await_core_connection(llm)
        # Only now: an abort sent while the core is not yet routable would fail the output handler. The dead
        # client's requests still running send outputs every step, so they are caught from here on.
        vllm_internals.abort_unknown_requests(llm, self.strays)
        return llm

    async def _await_core_connection(self, llm: Any) -> None:
        """Point the reclaimed slot's input path at this client's socket; return once the core's DEALER is routable.

        Its ROUTER drops a message for a peer it does not know (zmq_socket(3), ZMQ_ROUTER), so nothing
        may be sent before the core has reconnected: probe with ZMQ_ROUTER_MANDATORY, which makes such
        a send fail with EHOSTUNREACH instead. ZMQ_ROUTER_HANDOVER lets the core's connection take the
        identity the replayed greeting's connection used (zmq_setsockopt(3)).
        """
        import zmq

        socket = vllm_internals.client_input_socket(llm)
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        pointed = False
        deadline = time.monotonic() + RECLAIM_TIMEOUT_S
        while True:
            try:
                await vllm_internals.abort_in_core(llm, [_PROBE_REQUEST_ID])
                routed = True
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                routed = False
            if routed and pointed:
                break
            if not routed and not pointed:
                # The greeter's connection is gone: only the core can be routable from now on.
                self._slot.point_core_here()
                pointed = True
            if time.monotonic() > deadline:
                llm.shutdown()
                raise HostEngineReclaimFailed(
                    f"the host's engine core (pid {self._slot.state.core.pid}) did not reconnect to reclaimed client "
                    f"slot {self._slot.index} within {RECLAIM_TIMEOUT_S:g} s "
                    f"({'waited for its input socket' if pointed else 'waited for the replayed greeting to end'})"
                )
            await asyncio.sleep(0.01)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # vLLM's own behaviour from here on
        _LOG.info("the host's engine core reconnected to reclaimed client slot %d", self._slot.index)

    def _call(self, coroutine: Any) -> Any:
        """Run `coroutine` on the client's loop and wait for it; EngineDeadError once the core is gone.

        A call into a killed core (an add_request waiting on it) would otherwise wait forever: the
        watcher's verdict is checked every MONITOR_INTERVAL_S while waiting.
        """
        import concurrent.futures

        from vllm.v1.engine.exceptions import EngineDeadError

        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        while True:
            try:
                return future.result(timeout=MONITOR_INTERVAL_S)
            except concurrent.futures.TimeoutError:
                if self._dead is not None:
                    future.cancel()
                    raise EngineDeadError(str(self._dead)) from None

    @property
    def core_pid(self) -> int:
        return self._slot.state.core.pid

    @property
    def slot(self) -> Slot:
        return self._slot

    def get_tokenizer(self) -> Any:
        return self._llm.get_tokenizer()

    def add_request(self, request_id: str, prompt: Any, params: Any) -> None:
        """Hand one rendered request to the core; raises for a request the front end rejects."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        self._call(self._add(request_id, prompt, params))

    def abort_request(self, request_ids: list[str]) -> None:
        """Cancel running requests in the core (a stopped run), as LLMEngine.abort_request does in-process."""
        if self._dead is None:
            self._call(self._llm.abort(request_ids))

    async def _add(self, request_id: str, prompt: Any, params: Any) -> None:
        stream = await vllm_internals.add_request(self._llm, request_id, prompt, params)
        task = asyncio.get_running_loop().create_task(self._collect(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _collect(self, stream: Any) -> None:
        try:
            async for output in vllm_internals.first_and_final_outputs(stream):
                self._finished.put(output)
        except BaseException as exc:  # noqa: BLE001 - the output handler failed: the engine is gone for all requests
            self._finished.put(exc)

    def step(self) -> list[Any]:
        """The outputs since the last call: requests finished, leaders' first outputs (waits for at least one); raises once the engine is gone."""
        from vllm.v1.engine.exceptions import EngineDeadError

        while True:
            try:
                first = self._finished.get(timeout=MONITOR_INTERVAL_S)
                break
            except queue.Empty:
                if self._dead is not None:
                    raise EngineDeadError(str(self._dead)) from None
        outputs = [first]
        while True:
            try:
                outputs.append(self._finished.get_nowait())
            except queue.Empty:
                break
        for output in outputs:
            if isinstance(output, BaseException):
                self._dead = self._dead or output
                raise EngineDeadError(f"the host's engine core failed: {output!r}") from output
        return outputs

    def in_flight_limit(self) -> int:
        """This process's share of the host's in-flight limit, from the processes attached now."""
        return -(-self._host_in_flight // self.attached)

    def _watch_core(self) -> None:
        # vLLM's client notices a core that dies cleanly (it says ENGINE_CORE_DEAD) but not one that is
        # killed: it would wait for outputs forever. Watch the processes themselves.
        state = self._slot.state
        while not self._closed.wait(MONITOR_INTERVAL_S):
            attached = max(1, live_clients(state))
            if attached != self.attached:
                _LOG.info("%d process(es) attached to the host's engine core: %d requests in flight each",
                          attached, -(-self._host_in_flight // attached))
                self.attached = attached
            for name, process in (("engine core", state.core), ("engine-core supervisor", state.supervisor)):
                if not process.alive():
                    # Its own output says why (engine.host writes it to the generation's output file).
                    tail = output_tail(pathlib.Path(state.generation_dir))
                    cause = cause_of(tail) or "no error in its output"
                    self._dead = RuntimeError(f"the host's {name} (pid {process.pid}) exited: {cause}")
                    _LOG.error("%s; failing this process's outstanding requests. Its last output:\n%s",
                               self._dead, "\n".join(tail))
                    return

    def shutdown(self) -> None:
        """Detach from the core (which keeps serving the host's other processes) and release the slot."""
        self._closed.set()
        try:
            if self._dead is None:
                self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=10)
            self._slot.release()

    async def _shutdown(self) -> None:
        self._llm.shutdown()
