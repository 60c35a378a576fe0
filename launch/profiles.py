"""Named TPU launch profiles: the Dataflow worker shape for one engine profile.

A launch profile says where the engine runs (slice, workers, disk); the
engine profile it names (pipelines/engine_profiles.py) says how vLLM runs
there. They are kept apart because the same worker shape could serve
another model, and the engine profile is also what local tools read.
Profiles are checked when this module loads: a machine type that does not
match its accelerator, or a tensor-parallel size that is not the slice's
chip count, fails every command instead of a Dataflow job.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from launch.tpu import Slice, find_slice, harness_threads
from pipelines import engine_profiles

# Per-request image budgets above 280 soft tokens look truncated on TPU (FIELD-NOTES).
TPU_MAX_VISION_TOKENS = 280


def check_engine_fits(tpu_slice: Slice, engine: engine_profiles.EngineProfile) -> None:
    """Refuse an engine that would not use the slice's chips or would ask for a truncating image budget."""
    tensor_parallel = engine.engine_args.get("tensor_parallel_size", 1)
    if tensor_parallel != tpu_slice.chips:
        raise ValueError(
            f"{engine.name}: tensor_parallel_size {tensor_parallel} does not use the {tpu_slice.chips} chips "
            f"of a {tpu_slice.name} worker"
        )
    if engine.vision_tokens is None or engine.vision_tokens > TPU_MAX_VISION_TOKENS:
        raise ValueError(
            f"{engine.name}: vision_tokens {engine.vision_tokens}; at most {TPU_MAX_VISION_TOKENS} on TPU "
            "(larger budgets look truncated)"
        )


@dataclasses.dataclass(frozen=True)
class LaunchProfile:
    name: str
    description: str
    slice: Slice
    engine_profile: str  # a name in pipelines.engine_profiles.PROFILES
    model: str  # model shape for the planner (launch/model_shapes.py)
    max_workers: int  # default autoscaling ceiling (--max_workers overrides)
    disk_size_gb: int  # boot disk per worker

    def __post_init__(self) -> None:
        check_engine_fits(self.slice, engine_profiles.resolve(self.engine_profile))

    @property
    def harness_threads(self) -> int:
        return harness_threads(self.slice.vcpus)


# Boot disk: the staged bf16 checkpoint (~52 GB for 26B-A4B), the vllm-tpu image layers and the
# local XLA cache, with room for a 31B checkpoint (~62 GB) on the same profile shape.
_DISK_GB = 200


def _gemma4_26b_a4b(topology: str, machine_type: str, max_workers: int, note: str) -> LaunchProfile:
    """Gemma 4 26B-A4B on one v6e slice per worker, TP over all its chips."""
    tpu_slice = find_slice("tpu-v6e-slice", topology, machine_type)
    return LaunchProfile(
        name=f"tpu-{tpu_slice.name}",
        description=f"Gemma 4 26B-A4B on {tpu_slice.name} workers ({tpu_slice.chips} chips each, TP{tpu_slice.chips}): {note}",
        slice=tpu_slice,
        engine_profile=f"tpu-{tpu_slice.name}-gemma4-26b-a4b",
        model="gemma-4-26B-A4B",
        max_workers=max_workers,
        disk_size_gb=_DISK_GB,
    )


PROFILES: Mapping[str, LaunchProfile] = {
    profile.name: profile
    for profile in (
        # 4 workers: a first size for a nightly batch (16 chips); raise it once quota or a reservation allows.
        _gemma4_26b_a4b("2x2", "ct6e-standard-4t", 4, "the recipe-verified size."),
        # 2 workers: the same 16 chips as the v6e-4 default.
        _gemma4_26b_a4b("2x4", "ct6e-standard-8t", 2, "TP8 is unverified upstream."),
    )
}

# Shapes a user may reasonably ask for that are deliberately not offered, with the reason.
NOT_OFFERED: Mapping[str, str] = {
    "tpu-v6e-1": "Gemma 4 26B-A4B needs at least 4 v6e chips; E4B fits one chip but is untested/failing "
                 "upstream for vllm-tpu. Use tpu-v6e-4.",
    "tpu-v5e-4": "Gemma 4 26B-A4B fails to start on TPU v5e (vllm-project/tpu-inference#2453). Use tpu-v6e-4.",
    "tpu-v5e-8": "Gemma 4 26B-A4B fails to start on TPU v5e (vllm-project/tpu-inference#2453). Use tpu-v6e-8.",
}


def get_profile(name: str) -> LaunchProfile:
    if name in PROFILES:
        return PROFILES[name]
    if name in NOT_OFFERED:
        raise ValueError(f"launch profile {name!r} is not offered: {NOT_OFFERED[name]}")
    raise ValueError(f"unknown launch profile {name!r}; choose from {sorted(PROFILES)}")
