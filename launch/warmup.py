"""Compile-cache warm-up: one small job that fills the persistent XLA cache of a profile.

vLLM on TPU compiles its programs when the engine starts (~30 minutes for
26B-A4B). Pointed at a cache directory that already holds them, a worker
loads them instead. The warm-up runs the bundled samples (data/samples:
images, a TIFF and a PDF, every task) on exactly one worker with the
profile's engine arguments, so it writes the same cache entries the nightly
job's workers will look up (same image, same engine arguments, same path).
It fails, loudly, when the cache holds nothing once its engine has started
(`--xla_cache_required`).
"""
from __future__ import annotations

import datetime
import pathlib

from apache_beam.io.filesystems import FileSystems

from launch.deployment import Deployment
from launch.job import Workers

SAMPLES = pathlib.Path(__file__).resolve().parent.parent / "data" / "samples"
# One worker, no autoscaling: a second worker would compile the same programs again in parallel.
WARMUP_WORKERS = Workers(initial=1, maximum=1, autoscaling="NONE")
# The warm-up's own pipeline options: its engine start fails when the compile cache is still empty after it
# (engine.compile_cache), so a warm-up that saved nothing fails its job instead of succeeding.
PIPELINE_ARGS = ("--xla_cache_required=true",)  # KEY=VALUE: it is also a flex template parameter


def samples_location(deployment: Deployment) -> str:
    return f"{deployment.bucket_root}/warmup/inputs"


def samples_glob(deployment: Deployment) -> str:
    return f"{samples_location(deployment)}/*"


def output_location(deployment: Deployment, now: datetime.datetime) -> str:
    return f"{deployment.bucket_root}/warmup/runs/{now:%Y%m%d-%H%M%S}"


def sample_files() -> list[pathlib.Path]:
    files = sorted(path for path in SAMPLES.iterdir() if path.is_file())
    if not files:
        raise FileNotFoundError(f"no bundled samples in {SAMPLES}")
    return files


def stage_samples(deployment: Deployment) -> None:
    """Copy the bundled samples to GCS: the workers cannot read this machine's files."""
    target = samples_location(deployment)
    for path in sample_files():
        with FileSystems.create(f"{target}/{path.name}") as handle:
            handle.write(path.read_bytes())
