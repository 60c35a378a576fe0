"""Capacity arithmetic: time, chip-hours and cost of a batch on one launch profile (TPU or GPU workers).

Two estimates of the same work, side by side:

- roofline: a lower bound. Every chip at its peak bf16 FLOP/s and full HBM
  bandwidth, compute and memory traffic perfectly overlapped, no start-up,
  the whole block-aligned shared prefix reused by every follow-up task.
- realistic: matmuls at a stated MFU, decode at a stated fraction of HBM
  bandwidth, compute and memory not overlapped, each worker's start-up paid,
  prefix reuse and pipeline efficiency as measured by the benchmarks where
  available (benchmarks/results.json), stated defaults otherwise.

Per image: the vision tower runs once (vLLM's encoder cache serves the
image's other tasks); prefill computes each task's prompt minus what the
prefix cache supplies; decode is memory-bound: each step reads the weights
once for the whole batch (an MoE step touches nearly every expert once the
batch is large) plus each sequence's KV cache.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from launch.accelerators import Chip
from launch.model_shapes import ModelShape

# vLLM's default gpu_memory_utilization: the HBM share the engine plans weights + KV cache in.
HBM_UTILIZATION = 0.9
BF16_BYTES = 2


@dataclasses.dataclass(frozen=True)
class TaskLoad:
    name: str
    suffix_tokens: int  # prompt tokens after the shared prefix: instruction + closing template tokens
    output_tokens: int  # expected generated tokens (not the max_tokens limit)


@dataclasses.dataclass(frozen=True)
class Workload:
    images: float  # items x pages per item
    tasks: tuple[TaskLoad, ...]
    shared_prefix_tokens: int  # template + system prompt + image (soft tokens and its 2 delimiters)

    def prompt_tokens(self, task: TaskLoad) -> int:
        return self.shared_prefix_tokens + task.suffix_tokens


@dataclasses.dataclass(frozen=True)
class EngineShape:
    """What the planner reads from an engine profile."""

    max_num_seqs: int
    block_size: int
    weight_bytes: int  # per linear-layer parameter (bf16: 2; fp8: 1, where the chip computes fp8; embeddings stay bf16)
    kv_bytes: int  # per cached K or V element
    vision_tokens: int


@dataclasses.dataclass(frozen=True)
class Hardware:
    chip: Chip
    chips: int  # per worker


@dataclasses.dataclass(frozen=True)
class Efficiency:
    mfu: float  # fraction of peak FLOP/s reached by matmuls
    hbm_efficiency: float  # fraction of HBM bandwidth reached by decode
    pipeline_efficiency: float  # pipeline throughput / raw-engine throughput
    prefix_reuse_ratio: Optional[float]  # reused / shareable prefix tokens; None: all whole blocks reused
    startup_s: float  # per worker: image pull, checkpoint staging, engine load, compile or cache load
    overlap: bool  # compute and HBM traffic overlap perfectly (time = the larger) or not (their sum)


ROOFLINE = Efficiency(
    mfu=1.0, hbm_efficiency=1.0, pipeline_efficiency=1.0, prefix_reuse_ratio=None, startup_s=0.0, overlap=True
)


@dataclasses.dataclass(frozen=True)
class ImageWork:
    """Work one image brings, all tasks together."""

    prefill_tokens: float  # computed (not taken from the prefix cache)
    cached_tokens: float
    decode_tokens: float  # forward passes after each prompt's (whose last position gives the first token)
    flops: float
    hbm_bytes: float  # decode traffic: weight reads (shared by the batch) and KV reads
    batch: int  # sequences decoded together


def weight_bytes(shape: ModelShape, engine: EngineShape, experts_touched: float) -> float:
    """Weights one forward step reads: linear layers at the engine's precision, embedding/LM head in bf16."""
    experts = shape.layers * experts_touched * shape.expert_params
    return (shape.shared_linear_params + experts) * engine.weight_bytes + shape.embedding_params * BF16_BYTES


def decode_batch(shape: ModelShape, engine: EngineShape, hardware: Hardware, workload: Workload) -> int:
    """max_num_seqs, unless the HBM left after all weights holds fewer of the longest sequences."""
    resident = weight_bytes(shape, engine, shape.experts) + shape.vision_params * BF16_BYTES
    free = hardware.chip.hbm_bytes * hardware.chips * HBM_UTILIZATION - resident
    longest = max(workload.prompt_tokens(t) + t.output_tokens for t in workload.tasks)
    fits = math.floor(free / shape.kv_bytes_read(longest, engine.kv_bytes))
    if fits < 1:
        raise ValueError(f"{shape.name} leaves no HBM for KV cache on {hardware.chips} x {hardware.chip.name}")
    return min(engine.max_num_seqs, fits)


def cached_per_follow_up(workload: Workload, engine: EngineShape, prefix_reuse_ratio: Optional[float]) -> float:
    """Prompt tokens each task after an image's first takes from the prefix cache.

    Only whole blocks are shared, so at most floor(prefix / block) x block;
    a measured reuse ratio (of the shareable prefix) can only lower that.
    """
    aligned = workload.shared_prefix_tokens // engine.block_size * engine.block_size
    if prefix_reuse_ratio is None:
        return float(aligned)
    return min(float(aligned), prefix_reuse_ratio * workload.shared_prefix_tokens)


def image_work(
    shape: ModelShape, engine: EngineShape, hardware: Hardware, workload: Workload, efficiency: Efficiency
) -> ImageWork:
    batch = decode_batch(shape, engine, hardware, workload)
    follow_up = cached_per_follow_up(workload, engine, efficiency.prefix_reuse_ratio)
    prompts = [workload.prompt_tokens(t) for t in workload.tasks]
    hits = [0.0] + [follow_up] * (len(prompts) - 1)  # the image's first task computes its whole prompt
    lm_head = 2 * shape.embedding_params  # FLOPs per token whose logits are computed
    per_token = 2 * shape.active_linear_params
    # Prefill: a computed token attends to its position, (hit + prompt) / 2 on average; one LM head per prompt.
    prefill_flops = sum(
        (p - hit) * (per_token + shape.attention_flops_per_token((hit + p) / 2)) + lm_head
        for p, hit in zip(prompts, hits)
    )
    decode_flops = decode_bytes = decode_tokens = 0.0
    step_weights = weight_bytes(shape, engine, shape.experts_touched(batch)) / batch
    for task, prompt in zip(workload.tasks, prompts):
        passes = max(task.output_tokens - 1, 0)
        context = prompt + task.output_tokens / 2  # average context over the task's decode
        decode_tokens += passes
        decode_flops += passes * (per_token + lm_head + shape.attention_flops_per_token(context))
        decode_bytes += passes * (step_weights + shape.kv_bytes_read(context, engine.kv_bytes))
    flops = shape.vision_flops(engine.vision_tokens) + prefill_flops + decode_flops
    return ImageWork(sum(prompts) - sum(hits), sum(hits), decode_tokens, flops, decode_bytes, batch)


def seconds_per_image(work: ImageWork, hardware: Hardware, efficiency: Efficiency) -> float:
    """Worker seconds for one image (all the worker's chips together)."""
    compute = work.flops / (hardware.chip.peak_bf16_flops * hardware.chips * efficiency.mfu)
    memory = work.hbm_bytes / (hardware.chip.hbm_bytes_per_s * hardware.chips * efficiency.hbm_efficiency)
    engine_seconds = max(compute, memory) if efficiency.overlap else compute + memory
    return engine_seconds / efficiency.pipeline_efficiency


@dataclasses.dataclass(frozen=True)
class Estimate:
    work: ImageWork
    seconds_per_image: float  # per worker
    worker_hours: float  # all images, excluding start-up
    wall_hours: float  # with the given workers, start-up included
    chip_hours: float  # billed: every worker's chips from start-up to its share of the work
    cost_usd: float


def estimate(
    shape: ModelShape,
    engine: EngineShape,
    hardware: Hardware,
    workload: Workload,
    efficiency: Efficiency,
    workers: int,
    price_per_chip_hour: float,
) -> Estimate:
    """Items spread evenly over `workers` (assumes many more images than workers)."""
    work = image_work(shape, engine, hardware, workload, efficiency)
    seconds = seconds_per_image(work, hardware, efficiency)
    worker_hours = workload.images * seconds / 3600
    startup_hours = efficiency.startup_s / 3600
    chip_hours = hardware.chips * (worker_hours + workers * startup_hours)
    return Estimate(
        work=work,
        seconds_per_image=seconds,
        worker_hours=worker_hours,
        wall_hours=startup_hours + worker_hours / workers,
        chip_hours=chip_hours,
        cost_usd=chip_hours * price_per_chip_hour,
    )


def estimates(
    shape: ModelShape,
    engine: EngineShape,
    hardware: Hardware,
    workload: Workload,
    realistic: Efficiency,
    workers: int,
    price_per_chip_hour: float,
) -> Sequence[Estimate]:
    """(roofline, realistic)."""
    return tuple(
        estimate(shape, engine, hardware, workload, efficiency, workers, price_per_chip_hour)
        for efficiency in (ROOFLINE, realistic)
    )
