"""The environment variables this project reads, in one table, and the one accessor its readers use.

None of them configures a job: a job is configured by its options
(configuration/options.py), which travel with it to every worker. These
place a process's own files (caches, the host's engine-core state) or
shorten a timeout for tests, so they are set by whoever runs the process:
an operator's shell, the test suite (tests/conftest.py), a benchmark, or
the command line for the worker processes it starts. The table lives
this low (standard library only) so that every reader (engine/,
tiny_model/) can import it; README, "Environment variables", shows it,
and tests/test_configuration.py checks that every `VISION_BATCH_` name in
the tree is in it and read only through `read`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Variable:
    name: str
    default: str  # what the reader uses when the variable is unset or empty
    read_by: str  # module.function that reads it through `read`
    option: str  # the option that overrides it, or "none" and why no option does


MODEL_DIR = Variable(
    "VISION_BATCH_MODEL_DIR", "$TMPDIR/vision-batch-models", "engine/model_staging.py default_root",
    "none: where a worker stages gs:// weights is the worker's disk, not the job's choice; the command line "
    "pins it before moving TMPDIR (pipelines/vision_batch.py private_tempdir) so staged weights outlive the run",
)
CACHE = Variable(
    "VISION_BATCH_CACHE", "~/.cache/vision-batch", "tiny_model/checkpoint.py _cache_root",
    "none: the tiny checkpoints' build cache is per machine (tests point it at a fresh folder, tests/conftest.py)",
)
HOST_ENGINE_DIR = Variable(
    "VISION_BATCH_HOST_ENGINE_DIR", "$TMPDIR/vb-host-engine", "engine/host.py host_engine_root",
    "none: every SDK process of a host must find the same folder before any option reaches it (tests, benchmarks)",
)
HOST_ENGINE_IDLE_S = Variable(
    "VISION_BATCH_HOST_ENGINE_IDLE_S", "30 (engine/host.py _IDLE_GRACE_S)", "engine/host.py idle_grace_s",
    "none: tests only, to see a shared engine core stop in seconds",
)
VARIABLES: tuple[Variable, ...] = (MODEL_DIR, CACHE, HOST_ENGINE_DIR, HOST_ENGINE_IDLE_S)


def read(variable: Variable) -> Optional[str]:
    """The variable's value; None when unset or empty (the reader then uses its default)."""
    return os.environ.get(variable.name) or None
