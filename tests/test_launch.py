"""Dataflow TPU launch: profiles -> Beam options, slice pairing, overrides, offline dry runs."""
from __future__ import annotations

import datetime
import json
import sys
import time

import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions,
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)

from launch import run_dataflow, submit
from launch.deployment import Deployment
from launch.job import SINGLE_PROCESS_EXPERIMENT, Workers, plan_launch
from launch.profiles import NOT_OFFERED, PROFILES, LaunchProfile, get_profile
from launch.tpu import SLICES, SliceError, find_slice
from pipelines import engine_profiles
from pipelines.options import VisionBatchOptions
from tests.launch_support import DEPLOYMENT, DEPLOYMENT_FLAGS, USER_ARGS, go_offline


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_parses_into_the_dataflow_options_it_promises(name):
    profile = PROFILES[name]
    launch = plan_launch(profile, DEPLOYMENT, Workers.batch(profile.max_workers), "vision-batch-test", USER_ARGS)
    options = PipelineOptions(launch.dataflow_args())

    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == ("my-project", "us-east5", "gs://my-bucket/tmp")
    accelerator = profile.slice.generation.accelerator
    assert cloud.dataflow_service_options == [
        f"worker_accelerator=type:{accelerator};topology:{profile.slice.topology}"
    ]
    workers = options.view_as(WorkerOptions)
    assert workers.machine_type == profile.slice.machine_type
    assert (workers.num_workers, workers.max_num_workers) == (1, profile.max_workers)
    assert workers.autoscaling_algorithm == "THROUGHPUT_BASED"
    assert workers.disk_size_gb == profile.disk_size_gb
    assert workers.worker_zone == "us-east5-b"
    assert workers.sdk_container_image == (
        f"us-east5-docker.pkg.dev/my-project/vision-batch/vision-batch-tpu:0.1.0-{profile.slice.name}"
    )
    debug = options.view_as(DebugOptions)
    assert SINGLE_PROCESS_EXPERIMENT in debug.experiments
    assert debug.number_of_worker_harness_threads == profile.harness_threads <= 32
    assert options.view_as(SetupOptions).sdk_location == "container"
    assert options.view_as(StandardOptions).runner == "DataflowRunner"

    pipeline = options.view_as(VisionBatchOptions)
    assert pipeline.engine_profile == profile.engine_profile
    assert pipeline.vision_tokens == 280
    assert pipeline.xla_cache_path.startswith(f"gs://my-bucket/vision-batch/xla-cache/0.1.0-{profile.slice.name}/")


@pytest.mark.parametrize("tpu_slice", SLICES, ids=lambda s: s.machine_type)
def test_every_documented_pair_is_accepted(tpu_slice):
    assert find_slice(tpu_slice.generation.accelerator, tpu_slice.topology, tpu_slice.machine_type) is tpu_slice


@pytest.mark.parametrize(
    "accelerator, topology, machine_type, expected",
    [
        ("tpu-v6e-slice", "2x2", "ct6e-standard-8t", ["ct6e-standard-4t", "goes with topology 2x4"]),
        ("tpu-v6e-slice", "2x4", "ct6e-standard-4t", ["ct6e-standard-8t", "goes with topology 2x2"]),
        ("tpu-v5-lite-podslice", "2x2", "ct6e-standard-4t", ["ct5lp-hightpu-4t"]),
        ("tpu-v6e-slice", "1x1", "ct5lp-hightpu-1t", ["ct6e-standard-1t"]),
        ("tpu-v6e-slice", "4x4", "ct6e-standard-4t", ["not a single-host", "2x2"]),
        ("tpu-v4-podslice", "2x2x1", "ct4p-hightpu-4t", ["unknown TPU accelerator", "tpu-v6e-slice"]),
    ],
)
def test_invalid_pairs_are_refused_with_what_would_match(accelerator, topology, machine_type, expected):
    with pytest.raises(SliceError) as error:
        find_slice(accelerator, topology, machine_type)
    for fragment in expected:
        assert fragment in str(error.value)


@pytest.mark.parametrize("name", sorted(NOT_OFFERED))
def test_shapes_not_offered_say_why(name):
    with pytest.raises(ValueError, match="not offered") as error:
        get_profile(name)
    assert "tpu-inference#2453" in str(error.value) or "untested" in str(error.value)


def test_unknown_profile_lists_the_choices():
    with pytest.raises(ValueError, match="tpu-v6e-4"):
        get_profile("tpu-v9-4")


def test_a_profile_whose_tensor_parallel_size_misses_chips_cannot_be_defined():
    with pytest.raises(ValueError, match="tensor_parallel_size 4 does not use the 8 chips"):
        LaunchProfile("bad", "", find_slice("tpu-v6e-slice", "2x4", "ct6e-standard-8t"),
                      "tpu-v6e-4-gemma4-26b-a4b", "gemma-4-26B-A4B", 1, 100)


@pytest.mark.parametrize("name", sorted({p.engine_profile for p in PROFILES.values()}))
def test_tpu_engine_profiles_follow_the_tpu_rules(name):
    profile = engine_profiles.resolve(name)
    args = profile.engine_args
    assert args["disable_chunked_mm_input"] is True  # required for images on vllm-tpu
    assert args["block_size"] == 256
    assert args["max_num_batched_tokens"] >= profile.vision_tokens
    assert args["kv_cache_dtype"] == "fp8" and args["quantization"] == "fp8"
    assert profile.structured_output is False and "structured_outputs_config" not in args
    assert profile.vision_tokens <= 280
    assert profile.max_in_flight >= args["max_num_seqs"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--engine_arg", "tensor_parallel_size=8"], "does not use the 4 chips"),
        (["--vision_tokens", "560"], "vision_tokens 560; at most 280"),
        (["--engine_profile", "cpu-tiny"], "choose the TPU shape with --profile"),
    ],
)
def test_overrides_that_break_the_tpu_shape_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        plan_launch(PROFILES["tpu-v6e-4"], DEPLOYMENT, Workers.batch(1), "j", [*USER_ARGS, *extra])


def test_cache_path_follows_the_engine_arguments_and_the_image():
    def cache(deployment, extra):
        launch = plan_launch(PROFILES["tpu-v6e-4"], deployment, Workers.batch(1), "j", [*USER_ARGS, *extra])
        return PipelineOptions(list(launch.pipeline_args)).view_as(VisionBatchOptions).xla_cache_path

    base = cache(DEPLOYMENT, [])
    assert cache(DEPLOYMENT, []) == base
    assert cache(DEPLOYMENT, ["--engine_arg", "max_num_seqs=128"]) != base
    assert cache(DEPLOYMENT, ["--vision_tokens", "140"]) != base
    other_image = Deployment(**{**DEPLOYMENT.__dict__, "image": "us-docker.pkg.dev/p/r/custom:7"})
    assert "/7/tpu-v6e-4-gemma4-26b-a4b-" in cache(other_image, [])


def test_tpu_jobs_need_a_checkpoint_in_gcs(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path)
    launch = plan_launch(PROFILES["tpu-v6e-4"], DEPLOYMENT, Workers.batch(1), "j", USER_ARGS[:2] + ["--model=/local/dir"])
    with pytest.raises(ValueError, match="--model gs://"):
        run_dataflow.build_offline(launch.dataflow_args())


def test_dry_run_builds_the_dataflow_graph_offline_and_prints_the_command(monkeypatch, tmp_path, capsys):
    go_offline(monkeypatch, tmp_path)
    started = time.monotonic()
    assert submit.main(["--profile", "tpu-v6e-4", *USER_ARGS, *DEPLOYMENT_FLAGS, "--tasks", "ocr", "--dry-run"]) == 0
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    assert "transforms built for the DataflowRunner" in out
    assert "-m launch.run_dataflow" in out
    for fragment in ("--worker_machine_type=ct6e-standard-4t", "topology:2x2", "--sdk_location=container", "--tasks ocr"):
        assert fragment in out
    assert "nothing was staged or submitted" in out
    assert elapsed < 30, f"dry run took {elapsed:.1f} s"


def test_template_dry_run_prints_the_launch_request_and_gcloud_command(monkeypatch, tmp_path, capsys):
    go_offline(monkeypatch, tmp_path)
    assert submit.main(["--profile", "tpu-v6e-8", *USER_ARGS, *DEPLOYMENT_FLAGS, "--template", "--dry-run"]) == 0
    out = capsys.readouterr().out
    body = json.loads(out[out.index("{"): out.index("\n}\n") + 2])
    assert body["launchParameter"]["environment"]["machineType"] == "ct6e-standard-8t"
    assert body["launchParameter"]["containerSpecGcsPath"] == "gs://my-bucket/vision-batch/templates/vision-batch-0.1.0.json"
    assert "gcloud dataflow flex-template run" in out


def test_warmup_dry_run_uses_the_bundled_samples_on_one_worker(monkeypatch, tmp_path, capsys):
    go_offline(monkeypatch, tmp_path)
    flags = ["--profile", "tpu-v6e-4", "--model=gs://my-bucket/models/gemma", *DEPLOYMENT_FLAGS, "--warmup", "--dry-run"]
    assert submit.main(flags) == 0
    out = capsys.readouterr().out
    assert "would stage" in out and "report.pdf" in out
    assert "--input=gs://my-bucket/vision-batch/warmup/inputs/*" in out
    assert "--max_num_workers=1" in out and "--autoscaling_algorithm=NONE" in out


def test_date_placeholder_becomes_the_launch_date():
    expanded = run_dataflow.expand_date(["--output=gs://b/nightly/{date}", "--tasks=ocr"], datetime.date(2026, 11, 22))
    assert expanded == ["--output=gs://b/nightly/2026-11-22", "--tasks=ocr"]


@pytest.mark.skipif(sys.version_info[:2] == (3, 12), reason="only a Python other than the workers' is refused")
def test_direct_submission_refuses_a_python_other_than_the_workers():
    with pytest.raises(RuntimeError, match="Python 3.12"):
        run_dataflow.submit(["--runner=DataflowRunner"])


def test_the_cache_path_and_tpu_engine_reach_the_engine_settings(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path)
    launch = plan_launch(PROFILES["tpu-v6e-4"], DEPLOYMENT, Workers.batch(1), "j", USER_ARGS)
    _, config = run_dataflow.build([*launch.dataflow_args(), "--dry_run=True"], check_model=False)
    expected = PipelineOptions(list(launch.pipeline_args)).view_as(VisionBatchOptions).xla_cache_path
    assert config.engine.xla_cache_path == expected  # exported as VLLM_XLA_CACHE_PATH by the engine
    assert config.engine.engine_args["tensor_parallel_size"] == 4
    assert config.engine.structured_output is False and config.engine.vision_tokens == 280
    assert config.engine.model_path == "gs://my-bucket/models/gemma"
