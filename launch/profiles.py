"""Named launch profiles: the Dataflow worker shape for one engine profile.

A launch profile says where the engine runs (TPU slice or GPU, workers,
disk); the engine profile it names (engine/profiles.py) says how
vLLM runs there. They are kept apart because the engine profile is also
what local tools read. Profiles are checked when this module loads: a
machine type that does not match its accelerator, a tensor-parallel size
that is not the worker's chip count, or weights in a format the chip
cannot compute in fail every command instead of a Dataflow job.

Which to choose (docs/operations.md, "Choosing a profile"): `tpu-v6e-1`
for throughput per dollar; `gpu-l4` / `gpu-h100` without a TPU allowlist;
the 26B-A4B and 31B profiles for the larger models' quality.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from engine import profiles as engine_profiles
from launch.accelerators import TPU, WorkerShape, harness_threads
from launch.workers import PROFILE_WORKERS

# tpu-inference's Gemma 4 encoder-JIT path (compilation_config.cudagraph_mm_encoder) cuts each image's features to
# vision_config.default_output_length, Gemma 4's 280 (tpu_inference/models/jax/gemma4_mm.py,
# postprocess_encoder_output); its default eager path serves every budget whole (engine/profiles.py, _tpu_profile).
TPU_JIT_ENCODER_MAX_VISION_TOKENS = 280


def check_engine_fits(worker: WorkerShape, engine: engine_profiles.EngineProfile) -> None:
    """Refuse an engine that would not use the worker's chips, or that the chip cannot run as configured."""
    args = engine.engine_args
    tensor_parallel = args.get("tensor_parallel_size", 1)
    if tensor_parallel != worker.chips:
        raise ValueError(
            f"{engine.name}: tensor_parallel_size {tensor_parallel} does not use the {worker.chips} chips "
            f"of a {worker.machine_type} worker"
        )
    quantization = str(args.get("quantization", ""))
    if quantization.startswith("fp8") and not worker.chip.native_fp8:  # fp8 (a serialised checkpoint), fp8_per_tensor, ...
        raise ValueError(
            f"{engine.name}: fp8 weights on {worker.chip.name}, which has no fp8 matmuls "
            "(tpu-inference dtype support matrix: v5e/v6e compute int8, int4, bf16); serve bf16"
        )
    if worker.chip.platform == TPU:
        jit_encoder = (args.get("compilation_config") or {}).get("cudagraph_mm_encoder")
        cut = ((args.get("hf_overrides") or {}).get("vision_config") or {}).get(
            "default_output_length", TPU_JIT_ENCODER_MAX_VISION_TOKENS)
        if jit_encoder and (engine.vision_tokens or 0) > cut:
            raise ValueError(
                f"{engine.name}: vision_tokens {engine.vision_tokens} with compilation_config.cudagraph_mm_encoder: "
                f"tpu-inference's encoder-JIT path cuts each image to {cut} soft tokens "
                "(vision_config.default_output_length); drop cudagraph_mm_encoder, or add --engine_arg "
                f"'hf_overrides={{\"vision_config\": {{\"default_output_length\": {engine.vision_tokens}}}}}'"
            )
        if not args.get("disable_chunked_mm_input"):
            raise ValueError(f"{engine.name}: vllm-tpu needs disable_chunked_mm_input for images")
        if engine.structured_output:
            raise ValueError(f"{engine.name}: vllm-tpu has no structured output for Gemma 4")


@dataclasses.dataclass(frozen=True)
class LaunchProfile:
    name: str
    description: str
    worker: WorkerShape
    engine_profile: str  # a name in engine.profiles.PROFILES
    model: str  # model shape for the planner (launch/model_shapes.py)
    max_workers: int  # default autoscaling ceiling (--max_workers overrides)
    disk_size_gb: int  # boot disk per worker

    def __post_init__(self) -> None:
        check_engine_fits(self.worker, engine_profiles.resolve(self.engine_profile))

    @property
    def platform(self) -> str:
        return self.worker.chip.platform

    @property
    def harness_threads(self) -> int:
        return harness_threads(self.worker.vcpus)


# Boot disk per worker: the staged checkpoint (bf16: 12B ~24 GB, 26B-A4B ~52 GB, 31B ~62 GB), the worker image
# (the vLLM base images are ~10-20 GB) and the local XLA/CUDA-graph caches, with ~2x headroom.
_DISK_SMALL_MODEL_GB = 100
_DISK_LARGE_MODEL_GB = 200


PROFILES: Mapping[str, LaunchProfile] = {
    profile.name: profile
    for profile in (
        LaunchProfile(
            name="tpu-v6e-1",
            description="Gemma 4 12B on one v6e chip per worker (TP1): the throughput-per-dollar choice.",
            worker=PROFILE_WORKERS["tpu-v6e-1"],
            engine_profile="tpu-v6e-1-gemma4-12b",
            model="gemma-4-12B",
            # 16 chips, as 4 x tpu-v6e-4: many single-chip workers. A published sweep of the 12B on vllm-tpu
            # measured one v6e chip 2.7-3.2x faster in requests/s than a v6e-4 (TP4 all-reduce dominates a
            # model this size), at a quarter of the chips (launch/plan.py PUBLISHED_12B_V6E).
            max_workers=16,
            disk_size_gb=_DISK_SMALL_MODEL_GB,
        ),
        LaunchProfile(
            name="tpu-v6e-4",
            description="Gemma 4 26B-A4B on v6e-4 workers (4 chips, TP4): the recipes' 4-chip minimum.",
            worker=PROFILE_WORKERS["tpu-v6e-4"],
            engine_profile="tpu-v6e-4-gemma4-26b-a4b",
            model="gemma-4-26B-A4B",
            max_workers=4,  # 16 chips: a first size for a nightly batch; raise it once quota or a reservation allows
            disk_size_gb=_DISK_LARGE_MODEL_GB,
        ),
        LaunchProfile(
            name="tpu-v6e-8",
            description="Gemma 4 26B-A4B on v6e-8 workers (8 chips, TP8): the Trillium recipe's shape.",
            worker=PROFILE_WORKERS["tpu-v6e-8"],
            engine_profile="tpu-v6e-8-gemma4-26b-a4b",
            model="gemma-4-26B-A4B",
            max_workers=2,  # the same 16 chips as the tpu-v6e-4 default
            disk_size_gb=_DISK_LARGE_MODEL_GB,
        ),
        LaunchProfile(
            name="tpu-v6e-8-31b",
            description="Gemma 4 31B dense on v6e-8 workers (8 chips, TP8): the Trillium recipe.",
            worker=PROFILE_WORKERS["tpu-v6e-8-31b"],
            engine_profile="tpu-v6e-8-gemma4-31b",
            model="gemma-4-31B",
            max_workers=2,
            disk_size_gb=_DISK_LARGE_MODEL_GB,
        ),
        LaunchProfile(
            name="gpu-l4",
            description="Gemma 4 12B (fp8 weights) on one NVIDIA L4 per worker: no TPU allowlist needed.",
            worker=PROFILE_WORKERS["gpu-l4"],  # g2-standard-8: launch/workers.py says why
            engine_profile="gpu-l4-gemma4-12b-fp8",
            model="gemma-4-12B",
            max_workers=8,
            disk_size_gb=_DISK_SMALL_MODEL_GB,
        ),
        LaunchProfile(
            name="gpu-h100",
            description="Gemma 4 26B-A4B (bf16) on one NVIDIA H100 80GB per worker: no TPU allowlist needed.",
            worker=PROFILE_WORKERS["gpu-h100"],
            engine_profile="gpu-h100-gemma4-26b-a4b",
            model="gemma-4-26B-A4B",
            max_workers=4,
            disk_size_gb=_DISK_LARGE_MODEL_GB,
        ),
    )
}

if set(PROFILES) != set(PROFILE_WORKERS):
    raise ValueError(f"launch/workers.py and launch/profiles.py name different profiles: {sorted(set(PROFILES) ^ set(PROFILE_WORKERS))}")

# Shapes a user may reasonably ask for that are deliberately not offered, with the reason.
NOT_OFFERED: Mapping[str, str] = {
    "tpu-v5e-1": "Gemma 4 12B's bf16 weights (~24 GB) do not fit one v5e chip's 16 GB HBM. Use tpu-v6e-1.",
    "tpu-v5e-4": "Gemma 4 26B-A4B fails to start on TPU v5e (vllm-project/tpu-inference#2453). Use tpu-v6e-4.",
    "tpu-v5e-8": "Gemma 4 26B-A4B fails to start on TPU v5e (vllm-project/tpu-inference#2453). Use tpu-v6e-8.",
    "tpu-v6e-1-26b": "Gemma 4 26B-A4B needs at least 4 v6e chips (Trillium recipe: Min TPUs 4x). Use tpu-v6e-4, "
                     "or tpu-v6e-1 (the 12B).",
}


def get_profile(name: str) -> LaunchProfile:
    if name in PROFILES:
        return PROFILES[name]
    if name in NOT_OFFERED:
        raise ValueError(f"launch profile {name!r} is not offered: {NOT_OFFERED[name]}")
    raise ValueError(f"unknown launch profile {name!r}; choose from {sorted(PROFILES)}")

