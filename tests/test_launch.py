"""Dataflow launch: profiles -> Beam options, accelerator pairing, engine rules, overrides, offline dry runs."""
from __future__ import annotations

import datetime
import json
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

from configuration.options import VisionBatchOptions
from engine import profiles as engine_profiles
from engine.profiles import PROFILES as ENGINE_PROFILES
from launch import run_dataflow, submit
from launch.accelerators import GPU_WORKERS, TPU, TPU_WORKERS, AcceleratorError, find_gpu_worker, find_tpu_worker
from launch.deployment import Deployment
from launch.job import SINGLE_PROCESS_EXPERIMENT, Workers, plan_launch
from launch.profiles import NOT_OFFERED, PROFILES, LaunchProfile, get_profile
from tests.launch_support import BUCKET, DEPLOYMENT, DEPLOYMENT_FLAGS, MODEL, USER_ARGS, go_offline

TPU_PROFILES = sorted(name for name, p in PROFILES.items() if p.platform == TPU)
GPU_PROFILES = sorted(name for name, p in PROFILES.items() if p.platform != TPU)


def test_the_offered_profiles_are_the_documented_shapes():
    shapes = {name: (p.worker.machine_type, p.worker.chips, p.engine_profile) for name, p in PROFILES.items()}
    assert shapes == {
        "tpu-v6e-1": ("ct6e-standard-1t", 1, "tpu-v6e-1-gemma4-12b"),
        "tpu-v6e-4": ("ct6e-standard-4t", 4, "tpu-v6e-4-gemma4-26b-a4b"),
        "tpu-v6e-8": ("ct6e-standard-8t", 8, "tpu-v6e-8-gemma4-26b-a4b"),
        "tpu-v6e-8-31b": ("ct6e-standard-8t", 8, "tpu-v6e-8-gemma4-31b"),
        "gpu-l4": ("g2-standard-8", 1, "gpu-l4-gemma4-12b-fp8"),
        "gpu-h100": ("a3-highgpu-1g", 1, "gpu-h100-gemma4-26b-a4b"),
    }


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_parses_into_the_dataflow_options_it_promises(name):
    profile = PROFILES[name]
    launch = plan_launch(profile, DEPLOYMENT, Workers.batch(profile.max_workers), "vision-batch-test", USER_ARGS)
    options = PipelineOptions(launch.dataflow_args())

    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == ("my-project", "us-east5", f"gs://{BUCKET}/tmp")
    assert cloud.staging_location == f"gs://{BUCKET}/vision-batch/staging"
    assert cloud.dataflow_service_options == [profile.worker.service_option()]
    workers = options.view_as(WorkerOptions)
    assert workers.machine_type == profile.worker.machine_type
    assert (workers.num_workers, workers.max_num_workers) == (1, profile.max_workers)
    assert workers.autoscaling_algorithm == "THROUGHPUT_BASED"
    assert workers.disk_size_gb == profile.disk_size_gb
    assert workers.worker_zone == "us-east5-b"
    tag = f"vision-batch-tpu:0.1.0-{profile.worker.name}" if profile.platform == TPU else "vision-batch-gpu:0.1.0"
    assert workers.sdk_container_image == f"us-east5-docker.pkg.dev/my-project/vision-batch/{tag}"
    debug = options.view_as(DebugOptions)
    # Every profile: one SDK process owns the engine (feeders sharing a core are unverified on Dataflow).
    assert ENGINE_PROFILES[profile.engine_profile].host_feeders == 1
    assert SINGLE_PROCESS_EXPERIMENT in debug.experiments
    assert debug.number_of_worker_harness_threads == profile.harness_threads <= 32
    assert options.view_as(VisionBatchOptions).host_feeders == 1
    assert options.view_as(SetupOptions).sdk_location == "container"
    assert options.view_as(StandardOptions).runner == "DataflowRunner"

    pipeline = options.view_as(VisionBatchOptions)
    assert pipeline.engine_profile == profile.engine_profile
    # The image budgets are the workers' own plan of the job's options (page tasks at the profile's page budget).
    assert pipeline.vision_tokens is None
    if profile.platform == TPU:
        assert pipeline.xla_cache_path.startswith(f"gs://{BUCKET}/vision-batch/xla-cache/0.1.0-{profile.worker.name}/")
    else:  # GPUs: no XLA cache to keep
        assert pipeline.xla_cache_path is None


@pytest.mark.parametrize("worker", [*TPU_WORKERS, *GPU_WORKERS], ids=lambda w: w.machine_type)
def test_every_documented_pair_is_accepted(worker):
    if worker.chip.platform == TPU:
        assert find_tpu_worker(worker.chip.accelerator, worker.topology, worker.machine_type) is worker
    else:
        assert find_gpu_worker(worker.chip.accelerator, worker.chips, worker.machine_type) is worker


@pytest.mark.parametrize(
    "find, accelerator, shape, machine_type, expected",
    [
        (find_tpu_worker, "tpu-v6e-slice", "2x2", "ct6e-standard-8t", ["ct6e-standard-4t", "goes with topology 2x4"]),
        (find_tpu_worker, "tpu-v6e-slice", "2x4", "ct6e-standard-4t", ["ct6e-standard-8t", "goes with topology 2x2"]),
        (find_tpu_worker, "tpu-v5-lite-podslice", "2x2", "ct6e-standard-4t", ["ct5lp-hightpu-4t"]),
        (find_tpu_worker, "tpu-v6e-slice", "1x1", "ct5lp-hightpu-1t", ["ct6e-standard-1t"]),
        (find_tpu_worker, "tpu-v6e-slice", "4x4", "ct6e-standard-4t", ["not a single-host", "2x2"]),
        (find_tpu_worker, "tpu-v4-podslice", "2x2x1", "ct4p-hightpu-4t", ["unknown TPU accelerator", "tpu-v6e-slice"]),
        (find_tpu_worker, "nvidia-l4", "1x1", "g2-standard-8", ["unknown TPU accelerator"]),
        (find_gpu_worker, "nvidia-l4", 1, "a3-highgpu-1g", ["does not carry nvidia-l4", "carries nvidia-h100-80gb",
                                                          "g2-standard-8"]),
        (find_gpu_worker, "nvidia-h100-80gb", 1, "g2-standard-8", ["carries nvidia-l4", "a3-highgpu-1g"]),
        (find_gpu_worker, "nvidia-l4", 2, "g2-standard-8", ["count:2 does not match g2-standard-8", "carries 1"]),
        (find_gpu_worker, "nvidia-h100-80gb", 1, "a3-highgpu-8g", ["carries 8"]),
        (find_gpu_worker, "nvidia-l4", 1, "n1-standard-8", ["does not carry nvidia-l4"]),
        (find_gpu_worker, "nvidia-tesla-t4", 1, "n1-standard-8", ["unknown CUDA accelerator", "nvidia-l4"]),
    ],
)
def test_invalid_machine_accelerator_pairs_are_refused_with_what_would_match(find, accelerator, shape, machine_type,
                                                                             expected):
    with pytest.raises(AcceleratorError) as error:
        find(accelerator, shape, machine_type)
    for fragment in expected:
        assert fragment in str(error.value)


@pytest.mark.parametrize("name", sorted(NOT_OFFERED))
def test_shapes_not_offered_say_why(name):
    with pytest.raises(ValueError, match="not offered") as error:
        get_profile(name)
    assert "Use tpu-v6e" in str(error.value)


def test_unknown_profile_lists_the_choices():
    with pytest.raises(ValueError, match="tpu-v6e-1"):
        get_profile("tpu-v9-4")


@pytest.mark.parametrize(
    "worker, engine, message",
    [
        (find_tpu_worker("tpu-v6e-slice", "2x4", "ct6e-standard-8t"), "tpu-v6e-4-gemma4-26b-a4b",
         "tensor_parallel_size 4 does not use the 8 chips"),
        # The L4 engine's fp8 weights on a v6e chip, which computes int8/int4/bf16 only.
        (find_tpu_worker("tpu-v6e-slice", "1x1", "ct6e-standard-1t"), "gpu-l4-gemma4-12b-fp8", "no fp8 matmuls"),
        (find_gpu_worker("nvidia-l4", 1, "g2-standard-8"), "tpu-v6e-4-gemma4-26b-a4b", "does not use the 1 chips"),
    ],
)
def test_a_profile_whose_engine_does_not_fit_its_worker_cannot_be_defined(worker, engine, message):
    with pytest.raises(ValueError, match=message):
        LaunchProfile("bad", "", worker, engine, "gemma-4-26B-A4B", 1, 100)


@pytest.mark.parametrize("name", TPU_PROFILES)
def test_tpu_engine_profiles_follow_the_recipe(name):
    profile = PROFILES[name]
    engine = engine_profiles.resolve(profile.engine_profile)
    args = engine.engine_args
    # Trillium recipe: bf16 (no quantization), --disable_chunked_mm_input, TP over every chip of the VM.
    assert args["dtype"] == "bfloat16" and "quantization" not in args
    assert args["kv_cache_dtype"] == "auto"
    assert args["disable_chunked_mm_input"] is True
    assert args["tensor_parallel_size"] == profile.worker.chips
    assert args["block_size"] == 256
    # One page image at the largest budget and its prompt in one step (images are never chunked).
    assert args["max_num_batched_tokens"] >= engine.page_vision_tokens == 1120
    assert engine.structured_output is False and "structured_outputs_config" not in args
    assert not (args.get("compilation_config") or {}).get("cudagraph_mm_encoder")  # the eager encoder: budgets served whole
    assert engine.max_in_flight >= args["max_num_seqs"]


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_engine_profiles_follow_the_vllm_guide(name):
    profile = PROFILES[name]
    engine = engine_profiles.resolve(profile.engine_profile)
    args = engine.engine_args
    assert args["gpu_memory_utilization"] == 0.90  # vLLM's Gemma 4 guide
    assert args["tensor_parallel_size"] == profile.worker.chips == 1
    assert args["kv_cache_dtype"] == "auto"
    assert engine.structured_output is True and args["structured_outputs_config"]["backend"] == "xgrammar"
    assert engine.max_in_flight >= args["max_num_seqs"]
    assert "disable_chunked_mm_input" not in args  # a vllm-tpu requirement only


def test_the_h100_profile_takes_the_guides_26b_settings_and_the_l4_quantises_the_12b():
    h100 = engine_profiles.resolve("gpu-h100-gemma4-26b-a4b").engine_args
    assert (h100["max_model_len"], h100["dtype"], "quantization" in h100) == (32768, "bfloat16", False)
    l4 = engine_profiles.resolve("gpu-l4-gemma4-12b-fp8").engine_args
    assert l4["quantization"] == "fp8_per_tensor" and PROFILES["gpu-l4"].worker.chip.native_fp8


def test_every_quantised_profile_names_an_online_method_vllm_accepts_for_a_bf16_checkpoint():
    """Gemma 4's checkpoints are bf16: vLLM 0.32's `fp8` refuses them (Fp8Config: fp8-serialised only)."""
    from vllm.config.quantization import ONLINE_QUANT_SHORTHAND_NAMES

    quantised = {name: p.engine_args["quantization"] for name, p in engine_profiles.PROFILES.items() if "quantization" in p.engine_args}
    assert quantised and all(method in ONLINE_QUANT_SHORTHAND_NAMES for method in quantised.values()), quantised


@pytest.mark.parametrize(
    "profile, extra, message",
    [
        ("tpu-v6e-4", ["--engine_arg", "tensor_parallel_size=8"], "does not use the 4 chips"),
        # tpu-inference's encoder-JIT path cuts images to the checkpoint's default budget (launch/profiles.py).
        ("tpu-v6e-4", ["--vision_tokens", "560", "--engine_arg", 'compilation_config={"cudagraph_mm_encoder": true}'],
         "cuts each image to 280 soft tokens"),
        ("tpu-v6e-4", ["--task_vision_tokens", "ocr=1120", "--engine_arg", 'compilation_config={"cudagraph_mm_encoder": true}'],
         "vision_tokens 1120 with compilation_config.cudagraph_mm_encoder"),  # a task's own budget
        ("tpu-v6e-1", ["--engine_arg", "quantization=fp8"], "no fp8 matmuls"),
        ("tpu-v6e-1", ["--engine_arg", "quantization=fp8_per_tensor"], "no fp8 matmuls"),
        ("tpu-v6e-4", ["--engine_profile", "cpu-tiny"], "choose the worker shape with --profile"),
        ("gpu-l4", ["--engine_arg", "tensor_parallel_size=2"], "does not use the 1 chips"),
    ],
)
def test_overrides_that_break_the_worker_shape_are_refused(profile, extra, message):
    with pytest.raises(ValueError, match=message):
        plan_launch(PROFILES[profile], DEPLOYMENT, Workers.batch(1), "j", [*USER_ARGS, *extra])


@pytest.mark.parametrize("profile", ["gpu-h100", "tpu-v6e-1"])
def test_every_profile_may_raise_the_image_budget(profile):
    launch = plan_launch(PROFILES[profile], DEPLOYMENT, Workers.batch(1), "j", [*USER_ARGS, "--vision_tokens=1120"])
    assert PipelineOptions(list(launch.pipeline_args)).view_as(VisionBatchOptions).vision_tokens == 1120


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


def test_staging_defaults_to_the_projects_bucket_and_can_move():
    assert DEPLOYMENT.staging_root() == f"gs://{BUCKET}/vision-batch/staging"
    moved = Deployment(**{**DEPLOYMENT.__dict__, "staging_location": "gs://other-bucket/staging/"})
    assert moved.staging_root() == "gs://other-bucket/staging"
    with pytest.raises(ValueError, match="--staging_location must be a gs:// location"):
        Deployment(**{**DEPLOYMENT.__dict__, "staging_location": "/tmp/staging"})


def test_jobs_need_a_checkpoint_in_gcs(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path)
    launch = plan_launch(PROFILES["tpu-v6e-4"], DEPLOYMENT, Workers.batch(1), "j", USER_ARGS[:2] + ["--model=/local/dir"])
    with pytest.raises(ValueError, match="--model gs://"):
        run_dataflow.build_offline(launch.dataflow_args())


def test_dry_run_builds_the_dataflow_graph_offline_and_prints_the_command(monkeypatch, tmp_path, capsys):
    go_offline(monkeypatch, tmp_path)
    started = time.monotonic()
    assert submit.main(["--profile", "tpu-v6e-1", *USER_ARGS, *DEPLOYMENT_FLAGS, "--tasks", "ocr", "--dry-run"]) == 0
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    assert "transforms built for the DataflowRunner" in out
    assert "-m launch.run_dataflow" in out
    for fragment in ("--worker_machine_type=ct6e-standard-1t", "topology:1x1", "--sdk_location=container", "--tasks ocr",
                     f"--staging_location=gs://{BUCKET}/vision-batch/staging"):
        assert fragment in out
    assert "nothing was staged or submitted" in out
    assert elapsed < 30, f"dry run took {elapsed:.1f} s"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max_token", "ocr=512"], "unknown option --max_token; did you mean --max_tokens?"),
        (["--vision_tokens", "100"], "--vision_tokens: invalid choice: 100"),
        (["--tasks", "captions"], "unknown task 'captions'"),
        (["--vision_tokens", "560", "--engine_arg", 'compilation_config={"cudagraph_mm_encoder": true}'],
         "cuts each image to 280 soft tokens"),  # the launch profile's own refusal
        (["--profile", "tpu-v6e-9"], "unknown launch profile 'tpu-v6e-9'"),
    ],
)
def test_submit_refuses_a_mistaken_job_option_in_one_line_before_building_anything(monkeypatch, tmp_path, capsys, extra,
                                                                                    message):
    go_offline(monkeypatch, tmp_path)
    assert submit.main(["--profile", "tpu-v6e-4", *USER_ARGS, *DEPLOYMENT_FLAGS, *extra, "--dry-run"]) == 2
    captured = capsys.readouterr()
    [line] = captured.err.strip().splitlines()
    assert line.startswith("python -m launch.submit: error: ") and message in line
    assert "transforms built" not in captured.out


def test_template_dry_run_prints_the_launch_request_and_gcloud_command(monkeypatch, tmp_path, capsys):
    go_offline(monkeypatch, tmp_path)
    assert submit.main(["--profile", "gpu-l4", *USER_ARGS, *DEPLOYMENT_FLAGS, "--template", "--dry-run"]) == 0
    out = capsys.readouterr().out
    body = json.loads(out[out.index("{"): out.index("\n}\n") + 2])
    environment = body["launchParameter"]["environment"]
    assert environment["machineType"] == "g2-standard-8"
    assert environment["stagingLocation"] == f"gs://{BUCKET}/vision-batch/staging"
    assert "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver" in environment["additionalExperiments"]
    assert body["launchParameter"]["containerSpecGcsPath"] == f"gs://{BUCKET}/vision-batch/templates/vision-batch-0.1.0.json"
    assert "gcloud dataflow flex-template run" in out and f"--staging-location=gs://{BUCKET}/vision-batch/staging" in out


def test_warmup_dry_run_uses_the_bundled_samples_on_one_worker(monkeypatch, tmp_path, capsys):
    go_offline(monkeypatch, tmp_path)
    flags = ["--profile", "tpu-v6e-1", f"--model={MODEL}", *DEPLOYMENT_FLAGS, "--warmup", "--dry-run"]
    assert submit.main(flags) == 0
    out = capsys.readouterr().out
    assert "would stage" in out and "report.pdf" in out
    assert f"--input=gs://{BUCKET}/vision-batch/warmup/inputs/*" in out
    assert "--max_num_workers=1" in out and "--autoscaling_algorithm=NONE" in out


def test_warmup_is_refused_for_gpu_profiles(monkeypatch, tmp_path, capsys):
    go_offline(monkeypatch, tmp_path)
    assert submit.main(["--profile", "gpu-h100", f"--model={MODEL}", *DEPLOYMENT_FLAGS, "--warmup", "--dry-run"]) == 2
    assert "runs on GPUs" in capsys.readouterr().err


def test_date_placeholder_becomes_the_launch_date():
    expanded = run_dataflow.expand_date(["--output=gs://b/nightly/{date}", "--tasks=ocr"], datetime.date(2026, 11, 22))
    assert expanded == ["--output=gs://b/nightly/2026-11-22", "--tasks=ocr"]


def test_the_cache_path_and_tpu_engine_reach_the_engine_settings(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path)
    launch = plan_launch(PROFILES["tpu-v6e-1"], DEPLOYMENT, Workers.batch(1), "j", USER_ARGS)
    _, config = run_dataflow.build([*launch.dataflow_args(), "--dry_run=True"], check_model=False)
    expected = PipelineOptions(list(launch.pipeline_args)).view_as(VisionBatchOptions).xla_cache_path
    assert config.engine.xla_cache_path == expected  # exported as VLLM_XLA_CACHE_PATH by the engine
    assert config.engine.engine_args["tensor_parallel_size"] == 1
    assert config.engine.engine_args["dtype"] == "bfloat16"
    assert config.engine.structured_output is False and config.engine.vision_tokens == 280
    assert config.engine.model_path == MODEL


def test_the_host_feeders_choose_the_worker_layout():
    """--host_feeders 1 (every profile's) keeps one SDK process; a count the user gives is passed on as given, never
    the worker's vCPU count (issue 20: --host_feeders=180 split the in-flight limit to 5 per process)."""
    profile = PROFILES["tpu-v6e-8"]
    vcpus = profile.worker.vcpus

    def planned(*extra):
        launch = plan_launch(profile, DEPLOYMENT, Workers.batch(1), "j", [*USER_ARGS, *extra])
        options = PipelineOptions(launch.dataflow_args())
        return options.view_as(VisionBatchOptions).host_feeders, options.view_as(DebugOptions).experiments or []

    assert planned() == (1, [SINGLE_PROCESS_EXPERIMENT])
    assert planned("--host_feeders=3") == (3, [])
    assert planned("--host_feeders=1") == (1, [SINGLE_PROCESS_EXPERIMENT])
    with pytest.raises(ValueError, match=f"at most {vcpus} SDK processes"):
        planned(f"--host_feeders={vcpus + 1}")
    with pytest.raises(ValueError, match="at least 1"):
        planned("--host_feeders=0")


def test_the_runbook_follows_the_code():
    """The runbook's environment, Cloud Build grants, first-run path and the TPU-busy row against what the code does."""
    from tests.launch_support import ROOT

    operations = (ROOT / "docs" / "operations.md").read_text()
    runbook = operations[operations.index("## Runbook"):]
    assert runbook.index("source .venv/bin/activate") < runbook.index("python -m launch.")
    assert "--role=roles/artifactregistry.writer --member=serviceAccount:$BUILD_ACCOUNT" in runbook
    first = runbook[runbook.index("### First real run"):]
    steps = [first.index(step) for step in ("| 1. preflight", "| 2. warm-up", "| 3. a small job", "| 4. the nightly")]
    assert steps == sorted(steps)
    assert runbook.index("### 8. Preflight") < runbook.index("### 9. Warm") < runbook.index("### 12. Alerts")
    # The TPU-busy row says where the engine core runs, as the TPU engine profiles place it.
    [row] = [line for line in operations.splitlines() if line.startswith("| `open(/dev/vfio/0)")]
    core_process = {engine_profiles.resolve(PROFILES[name].engine_profile).engine_core_process for name in TPU_PROFILES}
    assert core_process == {True} and "VLLM_ENABLE_V1_MULTIPROCESSING=1" in row
