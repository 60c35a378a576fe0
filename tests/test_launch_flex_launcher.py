"""launch/run_dataflow.py run the way Dataflow's flex template launcher runs it, and direct submission up to the API.

The launcher VM executes FLEX_TEMPLATE_PYTHON_PY_FILE with the launch request turned into options, including
--template_location=<staging>/template_launches/<job id>/job_object; Beam 2.77 then writes the job there and
returns no job (apiclient.DataflowApplicationClient.create_job), and the launcher submits that job object. The
tests run exactly that process against the local GCS emulator and read back Beam's real job JSON.
"""
from __future__ import annotations

import json
import logging
import pathlib
import sys

import pytest

from engine.profiles import PROFILES as ENGINE_PROFILES
from launch import flex_launch, image, run_dataflow
from launch.accelerators import TPU
from launch.job import FEEDER_HARNESS_THREADS, SINGLE_PROCESS_EXPERIMENT, Workers, plan_launch
from launch.profiles import PROFILES
from tests.launch_support import (
    BUCKET,
    DEPLOYMENT,
    MODEL,
    USER_ARGS,
    RecordingDataflow,
    go_offline,
    job_object_location,
    launcher_argv,
    list_gcs,
    read_gcs,
    run_launcher,
)

SCRIPT = pathlib.Path(run_dataflow.__file__)
RUNNING = "%d.%d" % sys.version_info[:2]
JOB_ID = "2026-01-02_03_04_05-9876543210987654321"


@pytest.fixture(scope="module")
def staged_model(gcs):
    """A checkpoint location the launcher accepts: a 12B's config.json as Google publishes it (the launcher reads
    its shape: resolve_model checks it exists, engine/checkpoint_shape.py reads it)."""
    from tests.test_raw_checkpoint_configs import RAW

    client = gcs.client()
    bucket = client.bucket(BUCKET) if client.lookup_bucket(BUCKET) else client.create_bucket(BUCKET)
    bucket.blob(f"{MODEL[len(f'gs://{BUCKET}/'):]}/config.json").upload_from_string(json.dumps(RAW["12B"]))
    return MODEL


def launch_request(profile, tasks="ocr,detect"):
    launch = plan_launch(profile, DEPLOYMENT, Workers.batch(profile.max_workers), f"vision-batch-{profile.name}",
                         [*USER_ARGS, f"--tasks={tasks}"])
    return launch, flex_launch.launch_body(launch.settings, DEPLOYMENT.template_path(), launch.pipeline_args)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_the_flex_launcher_invocation_writes_the_job_object(name, gcs, staged_model, tmp_path):
    profile = PROFILES[name]
    launch, body = launch_request(profile)
    argv = launcher_argv(DEPLOYMENT.project, DEPLOYMENT.region, body, JOB_ID)

    done = run_launcher(SCRIPT, argv, gcs.endpoint, tmp_path)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "job object written to" in done.stderr
    job = json.loads(read_gcs(gcs, job_object_location(DEPLOYMENT.staging_root(), JOB_ID)))
    environment = job["environment"]
    [pool] = environment["workerPools"]
    assert job["name"] == f"vision-batch-{profile.name}" and job["type"] == "JOB_TYPE_BATCH"
    assert pool["machineType"] == profile.worker.machine_type
    worker_image = DEPLOYMENT.worker_image(profile)
    assert pool["workerHarnessContainerImage"] == worker_image
    [sdk] = pool["sdkHarnessContainerImages"]
    assert sdk["containerImage"] == worker_image
    # What no_use_multiple_sdk_containers does: one SDK harness container (one process) per worker VM.
    assert sdk["useSingleCorePerContainer"] is True
    # Profiles whose engine core several processes feed (host_feeders > 1) run one per vCPU instead.
    single = ENGINE_PROFILES[profile.engine_profile].host_feeders == 1
    assert (SINGLE_PROCESS_EXPERIMENT in environment["experiments"]) is single
    assert profile.worker.service_option() in environment["experiments"]  # flex templates: as an experiment
    assert pool["diskSizeGb"] == profile.disk_size_gb and environment["workerZone"] == "us-east5-b"
    assert pool["numWorkers"] == 1
    assert pool["autoscalingSettings"] == {"algorithm": "AUTOSCALING_ALGORITHM_BASIC", "maxNumWorkers": profile.max_workers}
    assert pool["numThreadsPerWorker"] == (profile.harness_threads if single else FEEDER_HARNESS_THREADS)
    assert environment["tempStoragePrefix"].startswith(f"storage.googleapis.com/{BUCKET}/tmp/")

    options = environment["sdkPipelineOptions"]["options"]
    assert options["engine_profile"] == profile.engine_profile
    assert options["model"] == MODEL and options["tasks"] == "ocr,detect"
    assert options["sdk_location"] == "container"
    assert (options.get("xla_cache_path") is not None) == (profile.platform == TPU)
    # Beam staged the pipeline under our staging location (not Dataflow's default bucket), where workers read it.
    assert options["pipelineUrl"].startswith(f"{DEPLOYMENT.staging_root()}/vision-batch-{profile.name}.")
    assert options["pipelineUrl"] in set(list_gcs(gcs, DEPLOYMENT.staging_root()))


def test_the_launcher_refuses_a_local_checkpoint_with_one_line(gcs, staged_model, tmp_path):
    profile = PROFILES["tpu-v6e-1"]
    _, body = launch_request(profile)
    body["launchParameter"]["parameters"]["model"] = "/models/gemma"
    done = run_launcher(SCRIPT, launcher_argv(DEPLOYMENT.project, DEPLOYMENT.region, body, JOB_ID), gcs.endpoint, tmp_path)
    assert done.returncode != 0
    assert "Dataflow jobs need --model gs://" in done.stderr


def test_direct_submission_sends_the_same_job_and_reports_its_id(gcs, staged_model, monkeypatch, tmp_path, caplog):
    """Direct submission runs on the workers' Python; this one stands in for it (the pickling check has its own test)."""
    go_offline(monkeypatch, tmp_path, allow_loopback=True)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint)
    monkeypatch.setattr(image, "WORKER_PYTHON", RUNNING)
    profile = PROFILES["gpu-l4"]
    launch, _ = launch_request(profile, tasks="caption")
    with RecordingDataflow() as dataflow, caplog.at_level(logging.INFO, logger="launch.run_dataflow"):
        submitted = run_dataflow.submit([*launch.dataflow_args(), f"--dataflow_endpoint={dataflow.endpoint}"])

    assert submitted.job_id == RecordingDataflow.JOB_ID and submitted.template_location is None
    assert f"dataflow/jobs/us-east5/{RecordingDataflow.JOB_ID}?project=my-project" in caplog.text
    [(path, job)] = dataflow.requests
    assert path.split("?")[0] == "/v1b3/projects/my-project/locations/us-east5/jobs"  # jobs.create
    environment = job["environment"]
    [pool] = environment["workerPools"]
    assert pool["machineType"] == "g2-standard-8"
    assert pool["sdkHarnessContainerImages"][0]["containerImage"] == DEPLOYMENT.worker_image(profile)
    # Direct submission carries the accelerator as a service option (--dataflow_service_options).
    assert environment["serviceOptions"] == ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
    assert SINGLE_PROCESS_EXPERIMENT in environment["experiments"]
    assert environment["sdkPipelineOptions"]["options"]["engine_profile"] == "gpu-l4-gemma4-12b-fp8"


def test_pickling_on_another_python_is_refused_except_in_the_launcher_image(monkeypatch):
    monkeypatch.delenv("FLEX_TEMPLATE_PYTHON_PY_FILE", raising=False)
    monkeypatch.setattr(image, "WORKER_PYTHON", "3.99")  # whatever runs this test is then "another Python"
    with pytest.raises(RuntimeError, match=f"submitting from Python {RUNNING}, but the workers run 3.99"):
        run_dataflow.check_pickling_python(None)
    with pytest.raises(RuntimeError, match=f"writing a template from Python {RUNNING}"):
        run_dataflow.check_pickling_python("gs://b/t")
    # The launcher image's build asserts its Python; it declares itself with the launcher's own variable.
    monkeypatch.setenv("FLEX_TEMPLATE_PYTHON_PY_FILE", "/template/launch/run_dataflow.py")
    run_dataflow.check_pickling_python("gs://b/staging/template_launches/j/job_object")
