"""Dataflow TPU worker shapes: which machine type goes with which accelerator and topology.

Dataflow takes a TPU worker as two settings that must agree: the machine
type (`--worker_machine_type`) and the accelerator service option
(`worker_accelerator=type:...;topology:...`). A mismatch is only reported
by the service after submission, so `find_slice` refuses it here first.
Only single-host slices exist on Dataflow (one worker VM owns the whole
slice), hence 1, 4 or 8 chips.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU chip generation: what Dataflow calls it and what one chip can do."""

    name: str  # "v6e": prefix of TPU_ACCELERATOR_TYPE values (v6e-4)
    accelerator: str  # Dataflow's worker_accelerator type
    machine_prefix: str  # Compute Engine machine types of this generation start with it
    peak_bf16_flops: float  # per chip, dense bf16 matmul peak
    hbm_bytes: float  # per chip
    hbm_bytes_per_s: float  # per chip
    price_per_chip_hour: float  # USD, on-demand (see PRICES_AS_OF)


# Chip facts: Cloud TPU system-architecture pages (v6e: "TPU v6e", v5e: "TPU v5e"), per chip.
# Prices: Cloud TPU pricing page, on-demand, US regions. Dataflow bills TPU workers under its own
# SKUs (Dataflow pricing page) plus the VM's vCPU, memory and disk: treat these as indicative.
PRICES_AS_OF = "as listed in 2025 on cloud.google.com/tpu/pricing; not re-checkable from this offline workspace"
V6E = Generation("v6e", "tpu-v6e-slice", "ct6e-standard-", 918e12, 32e9, 1638e9, 2.70)
V5E = Generation("v5e", "tpu-v5-lite-podslice", "ct5lp-hightpu-", 197e12, 16e9, 819e9, 1.20)
GENERATIONS = (V6E, V5E)


@dataclasses.dataclass(frozen=True)
class Slice:
    """One single-host TPU worker VM: machine type, accelerator topology and its TPU runtime environment."""

    generation: Generation
    topology: str  # Dataflow/TPU topology, chips per dimension
    machine_type: str
    vcpus: int  # of the VM (machine type table of each generation's docs page)

    @property
    def chips(self) -> int:
        rows, columns = (int(part) for part in self.topology.split("x"))
        return rows * columns

    @property
    def name(self) -> str:
        """`v6e-4`: the TPU accelerator type, also used in image tags and profile names."""
        return f"{self.generation.name}-{self.chips}"

    def service_option(self) -> str:
        return f"worker_accelerator=type:{self.generation.accelerator};topology:{self.topology}"

    def tpu_env(self) -> Mapping[str, str]:
        """TPU runtime variables baked into the worker image (FIELD-NOTES, Dataflow custom containers)."""
        rows, columns = self.topology.split("x")
        return {
            # The Dataflow VM has no TPU-VM metadata server entries: don't query them.
            "TPU_SKIP_MDS_QUERY": "1",
            # Single-host slice: one host in every dimension.
            "TPU_HOST_BOUNDS": "1,1,1",
            # The chips of this host, as x,y,z.
            "TPU_CHIPS_PER_HOST_BOUNDS": f"{rows},{columns},1",
            "TPU_ACCELERATOR_TYPE": self.name,
        }


# Every single-host pairing Dataflow accepts (FIELD-NOTES; vCPUs from the v6e/v5e machine-type tables).
SLICES: tuple[Slice, ...] = (
    Slice(V6E, "1x1", "ct6e-standard-1t", 44),
    Slice(V6E, "2x2", "ct6e-standard-4t", 180),
    Slice(V6E, "2x4", "ct6e-standard-8t", 180),
    Slice(V5E, "1x1", "ct5lp-hightpu-1t", 24),
    Slice(V5E, "2x2", "ct5lp-hightpu-4t", 112),
    Slice(V5E, "2x4", "ct5lp-hightpu-8t", 224),
)


class SliceError(ValueError):
    """An accelerator type, topology and machine type that Dataflow would not pair."""


def find_slice(accelerator: str, topology: str, machine_type: str) -> Slice:
    """The slice these three settings describe, or a SliceError saying what would match."""
    generation = next((g for g in GENERATIONS if g.accelerator == accelerator), None)
    if generation is None:
        raise SliceError(
            f"unknown TPU accelerator type {accelerator!r}; Dataflow TPU types: {[g.accelerator for g in GENERATIONS]}"
        )
    same_generation = [s for s in SLICES if s.generation is generation]
    by_topology = {s.topology: s for s in same_generation}
    if topology not in by_topology:
        raise SliceError(
            f"topology {topology!r} is not a single-host {accelerator} slice; choose from {sorted(by_topology)}"
        )
    expected = by_topology[topology]
    if machine_type != expected.machine_type:
        other = next((s for s in same_generation if s.machine_type == machine_type), None)
        hint = f" ({machine_type} goes with topology {other.topology})" if other else ""
        raise SliceError(
            f"machine type {machine_type!r} does not match worker_accelerator type:{accelerator};topology:{topology}: "
            f"that slice runs on {expected.machine_type}{hint}"
        )
    return expected


def harness_threads(vcpus: int) -> int:
    """SDK harness threads for one TPU worker process.

    All threads share one engine (one process per VM: the TPU opens once),
    so they only decode images and PDF pages and wait on the engine.
    Dataflow's default is too high on the 180-vCPU TPU hosts (FIELD-NOTES:
    lower it on >100-vCPU VMs); a quarter of the vCPUs,
    between 4 and 32, keeps decoding ahead of the engine with bounded
    memory (each thread holds at most one decode unit of pages).
    """
    return max(4, min(32, vcpus // 4))
