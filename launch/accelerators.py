"""Dataflow accelerator workers: which machine type goes with which TPU slice or GPU count.

Dataflow takes an accelerator worker as two settings that must agree: the
machine type (`--worker_machine_type`) and the accelerator service option
(`worker_accelerator=...`). A mismatch is only reported by the service
after submission, so `find_tpu_worker` and `find_gpu_worker` refuse it here
first, saying what would match. Only single-host shapes exist on Dataflow
(one worker VM owns all its chips), hence 1, 4 or 8 TPU chips.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

TPU = "tpu"  # vllm-tpu worker image (launch/Dockerfile, target tpu)
CUDA = "cuda"  # vLLM CUDA worker image (launch/Dockerfile, target cuda)


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip kind: what Dataflow calls it and what one chip can do."""

    name: str  # "v6e", "l4", "h100": image tags, profile names
    accelerator: str  # Dataflow's worker_accelerator type
    platform: str  # TPU or CUDA: which worker image and which engine rules apply
    peak_bf16_flops: float  # per chip, dense bf16 matmul peak
    hbm_bytes: float  # per chip (GPU: device memory)
    hbm_bytes_per_s: float  # per chip
    price_per_chip_hour: float  # USD, indicative (see PRICES_AS_OF)
    native_fp8: bool  # fp8 matmuls in hardware: fp8 weights are only offered where this holds
    # TPU only: Cloud TPU's AcceleratorType prefix, TPU_ACCELERATOR_TYPE = "<prefix>-<chips>". Not always the chip's
    # name: v5e slices are "v5litepod-1/-4/-8" (Cloud TPU docs, "TPU v5e": AcceleratorType v5litepod-N <->
    # ct5lp-hightpu-Nt), v6e slices "v6e-N". tpu-inference reads it to count cores per chip (vllm-project/tpu-inference
    # tpu_inference/tpu_info.py get_num_cores_per_chip: one core for a type starting "v5litepod" or "v6e", two
    # otherwise), so "v5e-4" would be taken for a two-core chip.
    tpu_type_prefix: Optional[str] = None


# TPU chip facts: Cloud TPU "TPU v6e" / "TPU v5e" system-architecture pages (per chip: v6e 918 TFLOP/s bf16,
# 32 GB HBM at 1640 GB/s; v5e 197 TFLOP/s, 16 GB at 819 GB/s). Natively supported hardware acceleration per
# vllm-project/tpu-inference support_matrices/nightly/hardware_acceleration_and_dtype_support_matrix.csv:
# v5/v6 "int8, int4, bf16", v7 "fp8_e4m3fn, fp8_e5m2, bf16": no fp8 matmuls on v5e/v6e.
# GPU chip facts: NVIDIA L4 and H100 SXM datasheets as commonly published (dense, without sparsity:
# L4 121 TFLOP/s bf16, 24 GB GDDR6 at 300 GB/s; H100 SXM 989 TFLOP/s, 80 GB HBM3 at 3.35 TB/s); both
# have fp8 tensor cores (Ada, Hopper). Not re-checkable from this offline workspace.
# Prices: Dataflow bills TPU jobs per TPU chip-hour and not for worker CPU and memory (Dataflow "Support
# for TPUs" page, Pricing); GPU jobs pay the GPU-hours plus the worker's vCPU, memory and disk (Dataflow
# pricing page). The figures are indicative list prices; pass --price-per-chip-hour to the planner.
PRICES_AS_OF = "indicative 2025 list prices (Cloud TPU / GPU pricing pages), not re-checkable offline"
V6E = Chip("v6e", "tpu-v6e-slice", TPU, 918e12, 32e9, 1640e9, 2.70, native_fp8=False, tpu_type_prefix="v6e")
V5E = Chip("v5e", "tpu-v5-lite-podslice", TPU, 197e12, 16e9, 819e9, 1.20, native_fp8=False, tpu_type_prefix="v5litepod")
L4 = Chip("l4", "nvidia-l4", CUDA, 121e12, 24e9, 300e9, 0.56, native_fp8=True)
H100 = Chip("h100", "nvidia-h100-80gb", CUDA, 989e12, 80e9, 3350e9, 9.80, native_fp8=True)
CHIPS = (V6E, V5E, L4, H100)


@dataclasses.dataclass(frozen=True)
class WorkerShape:
    """One Dataflow worker VM: machine type, its accelerators, and what the worker image must set for them."""

    chip: Chip
    chips: int  # accelerators attached to the VM
    machine_type: str
    vcpus: int  # of the VM (machine type tables of the Compute Engine / Cloud TPU docs)
    topology: Optional[str] = None  # TPU only: chips per dimension ("2x2")

    @property
    def name(self) -> str:
        """`v6e-4`, `l4-1`: image tags and profile names (a TPU's runtime type is `tpu_accelerator_type`)."""
        return f"{self.chip.name}-{self.chips}"

    def service_option(self) -> str:
        """The `--dataflow_service_options` value that attaches the accelerators."""
        if self.chip.platform == TPU:
            # Dataflow "Support for TPUs": worker_accelerator=type:TPU_TYPE;topology:TPU_TOPOLOGY.
            return f"worker_accelerator=type:{self.chip.accelerator};topology:{self.topology}"
        # Dataflow "Use NVIDIA L4 GPUs" / "Use GPUs": type, count, and Dataflow installs the driver.
        return f"worker_accelerator=type:{self.chip.accelerator};count:{self.chips};install-nvidia-driver"

    @property
    def tpu_accelerator_type(self) -> str:
        """Cloud TPU's name for this single-host slice: `v6e-4`, `v5litepod-4` (TPU_ACCELERATOR_TYPE)."""
        if self.chip.tpu_type_prefix is None:
            raise ValueError(f"{self.name} is not a TPU worker")
        return f"{self.chip.tpu_type_prefix}-{self.chips}"

    def image_env(self) -> Mapping[str, str]:
        """Runtime variables baked into the worker image for this shape (none for GPUs)."""
        if self.chip.platform != TPU:
            return {}
        rows, columns = self.topology.split("x")
        # What the TPU runtime would otherwise read from a TPU VM's metadata server. With TPU_SKIP_MDS_QUERY it takes
        # the accelerator type, bounds, worker id and worker hostnames from these variables instead (pytorch/xla
        # torch_xla/_internal/tpu.py, "Try bootstrapping tpu env from env vars", commit f2cb76f), and a Dataflow
        # worker VM is no TPU VM. A single host is worker 0 of a one-host slice named localhost: the same six
        # variables and values as a Dataflow TPU flex-template example (rachelgagnon/gemma-flex-tpu-example Dockerfile:
        # TPU_SKIP_MDS_QUERY=1, TPU_HOST_BOUNDS=1,1,1, TPU_WORKER_HOSTNAMES=localhost, TPU_WORKER_ID=0,
        # TPU_ACCELERATOR_TYPE=v6e-1, TPU_CHIPS_PER_HOST_BOUNDS "update based on topology"), and as Ray derives them
        # for one host (ray.util.tpu.get_jax_env_vars: TPU_WORKER_ID defaults to 0 for a single host). The Dockerfile
        # of Dataflow docs' "Run a pipeline with TPUs" (its custom container section) is not quoted here: unverified.
        return {
            "TPU_SKIP_MDS_QUERY": "1",
            "TPU_WORKER_ID": "0",
            "TPU_WORKER_HOSTNAMES": "localhost",
            # Single-host slice: one host in every dimension.
            "TPU_HOST_BOUNDS": "1,1,1",
            # The chips of this host, as x,y,z.
            "TPU_CHIPS_PER_HOST_BOUNDS": f"{rows},{columns},1",
            "TPU_ACCELERATOR_TYPE": self.tpu_accelerator_type,
        }


def _tpu(chip: Chip, topology: str, machine_type: str, vcpus: int) -> WorkerShape:
    rows, columns = (int(part) for part in topology.split("x"))
    return WorkerShape(chip, rows * columns, machine_type, vcpus, topology)


# Every single-host TPU pairing Dataflow accepts (Dataflow "Support for TPUs", supported accelerators table:
# tpu-v5-lite-podslice 1x1/2x2/2x4 <-> ct5lp-hightpu-1t/4t/8t, tpu-v6e-slice 1x1/2x2/2x4 <-> ct6e-standard-1t/4t/8t);
# vCPUs from the v6e/v5e machine-type tables.
TPU_WORKERS: tuple[WorkerShape, ...] = (
    _tpu(V6E, "1x1", "ct6e-standard-1t", 44),
    _tpu(V6E, "2x2", "ct6e-standard-4t", 180),
    _tpu(V6E, "2x4", "ct6e-standard-8t", 180),
    _tpu(V5E, "1x1", "ct5lp-hightpu-1t", 24),
    _tpu(V5E, "2x2", "ct5lp-hightpu-4t", 112),
    _tpu(V5E, "2x4", "ct5lp-hightpu-8t", 224),
)

# GPU machine types and the GPUs each carries (Compute Engine "GPU machine types"): the L4 comes only on G2
# machines ("Use NVIDIA L4 GPUs": the L4 type is available only with the G2 machine type), the H100 80GB on
# A3 High. Not every Compute Engine shape: the ones a one-engine-per-VM worker would use.
GPU_WORKERS: tuple[WorkerShape, ...] = (
    WorkerShape(L4, 1, "g2-standard-4", 4),
    WorkerShape(L4, 1, "g2-standard-8", 8),
    WorkerShape(L4, 1, "g2-standard-12", 12),
    WorkerShape(L4, 1, "g2-standard-16", 16),
    WorkerShape(L4, 2, "g2-standard-24", 24),
    WorkerShape(L4, 1, "g2-standard-32", 32),
    WorkerShape(L4, 4, "g2-standard-48", 48),
    WorkerShape(L4, 8, "g2-standard-96", 96),
    WorkerShape(H100, 1, "a3-highgpu-1g", 26),
    WorkerShape(H100, 2, "a3-highgpu-2g", 52),
    WorkerShape(H100, 4, "a3-highgpu-4g", 104),
    WorkerShape(H100, 8, "a3-highgpu-8g", 208),
)


class AcceleratorError(ValueError):
    """An accelerator and machine type that Dataflow would not pair."""


def _chip(accelerator: str, platform: str) -> Chip:
    chip = next((c for c in CHIPS if c.accelerator == accelerator and c.platform == platform), None)
    if chip is None:
        known = [c.accelerator for c in CHIPS if c.platform == platform]
        raise AcceleratorError(f"unknown {platform.upper()} accelerator type {accelerator!r}; Dataflow types offered here: {known}")
    return chip


def find_tpu_worker(accelerator: str, topology: str, machine_type: str) -> WorkerShape:
    """The TPU worker these three settings describe, or an AcceleratorError saying what would match."""
    chip = _chip(accelerator, TPU)
    same_chip = [w for w in TPU_WORKERS if w.chip is chip]
    by_topology = {w.topology: w for w in same_chip}
    if topology not in by_topology:
        raise AcceleratorError(
            f"topology {topology!r} is not a single-host {accelerator} slice; choose from {sorted(by_topology)}"
        )
    expected = by_topology[topology]
    if machine_type != expected.machine_type:
        other = next((w for w in same_chip if w.machine_type == machine_type), None)
        hint = f" ({machine_type} goes with topology {other.topology})" if other else ""
        raise AcceleratorError(
            f"machine type {machine_type!r} does not match worker_accelerator type:{accelerator};topology:{topology}: "
            f"that slice runs on {expected.machine_type}{hint}"
        )
    return expected


def find_gpu_worker(accelerator: str, count: int, machine_type: str) -> WorkerShape:
    """The GPU worker these three settings describe, or an AcceleratorError saying what would match."""
    chip = _chip(accelerator, CUDA)
    same_chip = [w for w in GPU_WORKERS if w.chip is chip]
    match = next((w for w in same_chip if w.machine_type == machine_type), None)
    if match is None:
        carrier = next((w for w in GPU_WORKERS if w.machine_type == machine_type), None)
        hint = f" ({machine_type} carries {carrier.chip.accelerator})" if carrier else ""
        raise AcceleratorError(
            f"machine type {machine_type!r} does not carry {accelerator}{hint}; "
            f"{accelerator} comes on {sorted({w.machine_type for w in same_chip})}"
        )
    if match.chips != count:
        raise AcceleratorError(
            f"worker_accelerator count:{count} does not match {machine_type}, which carries {match.chips} x {accelerator}"
        )
    return match


def harness_threads(vcpus: int) -> int:
    """SDK harness threads for one accelerator worker process.

    All threads share one engine (one SDK process per VM: a TPU opens
    once, and a second engine would not fit in a GPU's memory), so they
    only decode images and PDF pages and wait on the engine (Dataflow
    "Support for GPUs", GPUs and worker parallelism). Dataflow's
    default is too high on the 180-vCPU TPU hosts (Dataflow docs, "Run a
    pipeline with TPUs": lower it on >100-vCPU VMs); a quarter of the
    vCPUs, between 4 and 32, keeps decoding ahead of the engine with
    bounded memory (each thread holds at most one decode unit of pages).
    """
    return max(4, min(32, vcpus // 4))
