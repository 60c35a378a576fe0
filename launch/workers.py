"""Each launch profile's worker shape, without its engine: standard library only.

`launch.image` derives image names and build arguments from a profile's
worker shape alone, and launch/build_image.sh runs it with any python3 (no
virtual environment, no Beam, no vLLM). `launch.profiles` pairs these shapes
with their engine profiles and checks the pairs; it refuses a profile
missing here, so the two lists cannot drift.
"""
from __future__ import annotations

from typing import Mapping

from launch.accelerators import WorkerShape, find_gpu_worker, find_tpu_worker

PROFILE_WORKERS: Mapping[str, WorkerShape] = {
    "tpu-v6e-1": find_tpu_worker("tpu-v6e-slice", "1x1", "ct6e-standard-1t"),
    "tpu-v6e-4": find_tpu_worker("tpu-v6e-slice", "2x2", "ct6e-standard-4t"),
    "tpu-v6e-8": find_tpu_worker("tpu-v6e-slice", "2x4", "ct6e-standard-8t"),
    "tpu-v6e-8-31b": find_tpu_worker("tpu-v6e-slice", "2x4", "ct6e-standard-8t"),
    # g2-standard-8: 8 vCPUs and 32 GB of host memory for decoding beside one L4 (g2-standard-4's 16 GB is tight
    # for the checkpoint staging and decode threads).
    "gpu-l4": find_gpu_worker("nvidia-l4", 1, "g2-standard-8"),
    # One H100 holds 26B-A4B in bf16 (vLLM's Gemma 4 guide: min 1x 80 GB). Whether a3-highgpu-1g is offered on
    # demand in your region, or only as Spot/flex-start, is not verified here: check the Compute Engine "A3 High"
    # page and your quota (NVIDIA_H100_GPUS).
    "gpu-h100": find_gpu_worker("nvidia-h100-80gb", 1, "a3-highgpu-1g"),
}


def profile_worker(name: str) -> WorkerShape:
    if name not in PROFILE_WORKERS:
        raise ValueError(f"unknown launch profile {name!r}; choose from {sorted(PROFILE_WORKERS)}")
    return PROFILE_WORKERS[name]
