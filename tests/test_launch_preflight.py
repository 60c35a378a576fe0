"""launch.preflight: the canary's job graph run for real on the local runner against the GCS emulator, its checks run
here where they can (processes, device holders, bucket, cache, model staging), its report and exit code from recorded
findings, the flex launcher's invocation of the canary, and the Cloud Logging query on a recorded response (there is
no Cloud Logging emulator)."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from configuration.options import JobConfig
from engine.checkpoint_shape import CheckpointShape
from launch import canary, flex_launch, preflight, run_dataflow
from launch.deployment import Deployment
from launch.profiles import PROFILES
from pipelines.runner import make_runner
from tests.conftest import SAMPLES
from tests.launch_support import DEPLOYMENT, DEPLOYMENT_FLAGS, go_offline, job_object_location, launcher_argv, read_gcs, run_launcher
from tests.gcs_emulator import BUCKET as TEST_BUCKET

MARKER = "vb-preflight-20260102-030405-abc123"
JOB_ID = "2026-01-02_03_04_05-1111111111111111111"
LOCAL = preflight.Expectations(accelerator=False, xla_cache=False, sdk_processes=1)
TPU_1 = preflight.Expectations(accelerator=True, xla_cache=True, sdk_processes=1)


def tpu_findings(**changes):
    """What a healthy tpu-v6e-1 worker's probe records (the shape Probe.process writes)."""
    found = {
        "marker": MARKER, "host": "vision-batch-preflight-t-12061030-abcd-harness-x1z2", "pid": 61,
        "summary": "gs://b/vision-batch/preflight/runs/r/output/run_summary.json",
        "imports": {"versions": {"vllm": "0.32.0", "torch": "2.9.0", "apache_beam": "2.77.0", "pipelines.vision_batch": None},
                    "errors": {}},
        "sdk_processes": {"pids": [61], "this_pid": 61, "same_container": True},
        "accelerator_holders": {"/dev/vfio/0": [61]},
        "engine_starts_s": [412.5],
        "xla_cache": {"path": "gs://b/vision-batch/xla-cache/0.1.0-v6e-1/p-1", "entries": 37, "bytes": 2.1e9,
                      "newest_write": 1767322000.0, "read_back": True},
        "bucket": {"uri": "gs://b/vision-batch/preflight/runs/r/findings/round-trip", "write": True, "read_back": True,
                   "delete": True, "error": None, "identity": "vision-batch-worker@my-project.iam.gserviceaccount.com"},
        "model": {"uri": "gs://b/m", "local": "/tmp/vision-batch-models/ab12", "config_json": True, "files": 9,
                  "bytes": 2.4e10, "error": None},
    }
    found.update(changes)
    return found


SUMMARY = {"state": "SUCCEEDED", "wall_time_s": 905.0, "counts": {"items": 4}}
LOG_LINE = f"vision-batch preflight marker {MARKER}: worker w pid 61"


def test_a_healthy_tpu_worker_passes_every_check(capsys):
    checks = preflight.evaluate(TPU_1, "JOB_STATE_DONE", [tpu_findings()], SUMMARY, LOG_LINE, MARKER)
    assert [c.name for c in checks] == [
        "canary job", "image imports", "accelerator", "SDK processes per VM", "engine start", "XLA cache",
        "bucket read/write", "model staged", "worker log in Cloud Logging", "canary items/s",
    ]
    assert all(c.ok for c in checks), checks
    assert preflight.report(checks) == 0
    out = capsys.readouterr().out
    assert "preflight passed" in out and "held by one process (pid 61)" in out and "ready in 412.5 s" in out
    assert "as vision-batch-worker@my-project.iam.gserviceaccount.com" in out and "0.004 items/s" in out


@pytest.mark.parametrize(
    "changes, failed, fragment",
    [
        ({"imports": {"versions": {}, "errors": {"vllm": "ImportError: libtpu.so"}}}, "image imports", "libtpu.so"),
        ({"accelerator_holders": {"/dev/vfio/0": [61, 75]}}, "accelerator", "held by 2 processes"),
        ({"accelerator_holders": {"/dev/vfio/0": []}}, "accelerator", "the engine did not open"),
        ({"accelerator_holders": {}}, "accelerator", "no accelerator device file"),
        ({"sdk_processes": {"pids": [61, 62], "this_pid": 61, "same_container": True}}, "SDK processes per VM", "expected 1"),
        ({"engine_starts_s": []}, "engine start", "ready in N s"),
        ({"xla_cache": {"path": "gs://b/c", "entries": 0, "bytes": 0, "newest_write": None, "read_back": None}},
         "XLA cache", "nothing written"),
        ({"bucket": {"uri": "gs://b/x", "write": False, "read_back": False, "delete": False, "identity": None,
                     "error": "Forbidden: 403"}}, "bucket read/write", "write of gs://b/x failed"),
        ({"model": {"uri": "gs://b/m", "local": None, "config_json": False, "error": "NotFound: 404"}}, "model staged", "404"),
    ],
)
def test_the_report_exits_non_zero_naming_the_first_failed_check(changes, failed, fragment, capsys):
    checks = preflight.evaluate(TPU_1, "JOB_STATE_DONE", [tpu_findings(**changes)], SUMMARY, LOG_LINE, MARKER)
    assert preflight.report(checks) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"preflight failed: {failed}: ") and fragment in err


def test_a_canary_that_left_nothing_fails_at_the_job_and_every_worker_check(capsys):
    checks = preflight.evaluate(TPU_1, "JOB_STATE_FAILED", [], None, None, MARKER)
    assert [c.ok for c in checks] == [False] * len(checks)
    assert preflight.report(checks) == 1
    assert capsys.readouterr().err.startswith("preflight failed: canary job: JOB_STATE_FAILED")


def test_the_worker_log_check_fails_when_cloud_logging_has_no_marker():
    [log] = [c for c in preflight.evaluate(TPU_1, "JOB_STATE_DONE", [tpu_findings()], SUMMARY, None, MARKER)
             if c.name == "worker log in Cloud Logging"]
    assert log.ok is False and "roles/logging.logWriter" in log.detail


class RecordedLogging:
    """Answers entries.list with a response recorded in the API's shape (LogEntry: logName, resource, jsonPayload)."""

    def __init__(self, entries):
        self.entries, self.requests = entries, []

    def post(self, url, json, timeout):  # noqa: A002 - requests' keyword
        self.requests.append((url, json))
        entries = self.entries

        class Response:
            def raise_for_status(self):
                pass

            def json(self):
                return {"entries": entries} if entries else {}

        return Response()


def test_the_cloud_logging_query_finds_the_workers_marker_line():
    entry = {
        "logName": "projects/my-project/logs/dataflow.googleapis.com%2Fworker",
        "resource": {"type": "dataflow_step", "labels": {"job_id": JOB_ID, "step_id": "PreflightProbe",
                                                          "project_id": "my-project", "region": "us-east5"}},
        # Only the text is relied on: Beam sends no logger name (apache_beam/runners/worker/log_handler.py), and
        # Dataflow's layout of the rest is not public (launch/preflight.py, LOG_FILTER).
        "jsonPayload": {"message": LOG_LINE},
        "severity": "WARNING", "timestamp": "2026-01-02T03:20:00.123Z",
    }
    session = RecordedLogging([entry])
    assert preflight.find_log_line("my-project", JOB_ID, MARKER, session=session, wait_s=0) == LOG_LINE
    [(url, body)] = session.requests
    assert url == "https://logging.googleapis.com/v2/entries:list"
    assert body["resourceNames"] == ["projects/my-project"]
    assert body["filter"] == f'resource.type="dataflow_step" AND resource.labels.job_id="{JOB_ID}" AND "{MARKER}"'

    silent = RecordedLogging([])
    assert preflight.find_log_line("my-project", JOB_ID, MARKER, session=silent, attempts=3, wait_s=0) is None
    assert len(silent.requests) == 3  # logs arrive late: asked again before giving up


def test_the_operators_logs_explorer_query_is_the_preflights_filter():
    """docs/operations.md tells operators to find the engine's lines with the very filter the preflight searches
    Cloud Logging with: one form, whose reasons are cited once (launch/preflight.py, LOG_FILTER)."""
    docs = (pathlib.Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    assert preflight.LOG_FILTER.format(job_id="JOB_ID", marker="[engine core]") in docs


def test_accelerator_holders_are_read_from_proc(tmp_path):
    """A stand-in device file held by this process and a child: both found, as two holders of one device."""
    device = tmp_path / "accel0"
    device.write_bytes(b"")
    patterns = [str(tmp_path / "accel[0-9]*")]
    with open(device, "rb"):
        assert canary.accelerator_holders(patterns) == {str(device): [os.getpid()]}
        child = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); print(flush=True); time.sleep(60)",
                                  str(device)], stdout=subprocess.PIPE)
        try:
            child.stdout.readline()  # the child has the file open
            assert canary.accelerator_holders(patterns) == {str(device): sorted([os.getpid(), child.pid])}
        finally:
            child.kill()
            child.wait()
    assert canary.accelerator_holders(patterns) == {str(device): []}
    assert canary.accelerator_holders([str(tmp_path / "none*")]) == {}


def test_sdk_processes_counts_harness_processes_of_this_container():
    """Beam's boot starts the harnesses side by side (each a child of boot, here of a shell); a process a harness
    starts itself with the same command line (a forked vLLM engine core) is not another harness."""
    script = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    # The "boot" shell gets the harness's command line through its environment: its own stays free of it, as boot's.
    boot = subprocess.Popen(["/bin/sh", "-c", '"$PYTHON" -c "$SCRIPT" "$HARNESS" & wait'], stdout=subprocess.PIPE,
                            start_new_session=True,
                            env={**os.environ, "PYTHON": sys.executable, "SCRIPT": script, "HARNESS": canary.SDK_HARNESS_MODULE})
    forked = subprocess.Popen([sys.executable, "-c", script, canary.SDK_HARNESS_MODULE], stdout=subprocess.PIPE)
    try:
        sibling = int(boot.stdout.readline())
        forked.stdout.readline()
        found = canary.sdk_processes()
    finally:
        os.killpg(boot.pid, signal.SIGKILL)
        forked.kill()
        boot.wait()
        forked.wait()
    assert found["this_pid"] == os.getpid() and {os.getpid(), sibling} <= set(found["pids"])
    assert forked.pid not in found["pids"]
    assert found["same_container"] is True


def test_the_xla_cache_check_lists_and_reads_back_gcs(gcs):
    prefix = f"gs://{TEST_BUCKET}/preflight-cache/0.1.0-v6e-1/p-1"
    assert canary.xla_cache(None) is None
    empty = canary.xla_cache(prefix)
    assert (empty["entries"], empty["read_back"]) == (0, None)
    bucket = gcs.client().bucket(TEST_BUCKET)
    bucket.blob("preflight-cache/0.1.0-v6e-1/p-1/jit_a/executable").upload_from_string(b"x" * 300)
    bucket.blob("preflight-cache/0.1.0-v6e-1/p-1/jit_b/executable").upload_from_string(b"y" * 100)
    written = canary.xla_cache(prefix)
    assert (written["entries"], written["bytes"], written["read_back"]) == (2, 400, True)
    assert preflight._xla_cache({"xla_cache": written}, TPU_1).ok is True
    assert "nothing written" in preflight._xla_cache({"xla_cache": empty}, TPU_1).detail


def test_the_preflight_dry_run_builds_the_canary_graph_offline(monkeypatch, tmp_path, capsys):
    go_offline(monkeypatch, tmp_path)
    assert preflight.main(["--profile", "tpu-v6e-1", *DEPLOYMENT_FLAGS, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "canary job graph:" in out and "nothing was staged or submitted" in out
    root = f"{DEPLOYMENT.bucket_root}/preflight"
    for fragment in (f"--model={root}/models/", "--max_num_workers=1", "--autoscaling_algorithm=NONE", "--tasks=ocr,caption",
                     f"--preflight_findings={root}/runs/", "--preflight_marker=vb-preflight-", f"--xla_cache_path={root}/xla-cache/",
                     "--worker_machine_type=ct6e-standard-1t"):
        assert fragment in out, fragment


def test_the_preflight_refuses_a_mistake_before_building_anything(monkeypatch, tmp_path, capsys):
    go_offline(monkeypatch, tmp_path)
    assert preflight.main(["--profile", "tpu-v6e-1", *DEPLOYMENT_FLAGS, "--items", "0", "--dry-run"]) == 2
    assert "--items must be at least 1" in capsys.readouterr().err


@pytest.fixture()
def gcs_deployment(gcs):
    return Deployment(project="my-project", region="us-east5", temp_location=f"gs://{TEST_BUCKET}/tmp", zone="us-east5-b")


def test_the_flex_launcher_writes_the_canary_job_with_its_probe(gcs, gcs_deployment, tiny_checkpoint, tmp_path):
    """The canary through the template's own entry point (launch/run_dataflow.py), as Dataflow's launcher runs it."""
    import datetime

    bucket = gcs.client().bucket(TEST_BUCKET)
    model = f"gs://{TEST_BUCKET}/vision-batch/preflight/models/tiny"
    # The tiny checkpoint's config.json, as the preflight stages it: the launcher reads the checkpoint's shape.
    bucket.blob("vision-batch/preflight/models/tiny/config.json").upload_from_filename(str(tiny_checkpoint / "config.json"))
    planned = preflight.plan_canary(PROFILES["tpu-v6e-1"], gcs_deployment, model, 2, [],
                                    datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc))
    body = flex_launch.launch_body(planned.launch.settings, gcs_deployment.template_path(), planned.launch.pipeline_args)
    done = run_launcher(pathlib.Path(run_dataflow.__file__),
                        launcher_argv(gcs_deployment.project, gcs_deployment.region, body, JOB_ID), gcs.endpoint, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    job = json.loads(read_gcs(gcs, job_object_location(gcs_deployment.staging_root(), JOB_ID)))
    options = job["environment"]["sdkPipelineOptions"]["options"]
    # Runner v2: the graph travels as the staged Beam pipeline proto the job object points to.
    from apache_beam.portability.api import beam_runner_api_pb2

    graph = beam_runner_api_pb2.Pipeline.FromString(read_gcs(gcs, options["pipelineUrl"]))
    names = {transform.unique_name for transform in graph.components.transforms.values()}
    assert {"PreflightProbe", "RunTasks", "RunSummary"} <= names, sorted(names)
    assert options["preflight_findings"] == planned.findings and options["preflight_marker"] == planned.marker
    assert canary.PLUGIN in options["beam_plugins"]
    assert options["max_error_fraction"] == 1.0 and options["limit"] == 2


@pytest.mark.engine
def test_the_canary_runs_the_job_and_its_probe_on_the_local_runner_against_gcs(gcs, tiny_checkpoint, capsys):
    """The canary's graph as run_dataflow builds it, on the FnApiRunner, every location on the GCS emulator: the job
    writes its outputs, the probe writes this process's findings, and the report judges them."""
    import launch.canary_plugin  # noqa: F401 - what the worker harness imports first (--beam_plugins)
    from pipelines import vision_batch

    root = f"gs://{TEST_BUCKET}/canary"
    gcs.upload(tiny_checkpoint, f"{root}/model")
    for path in sorted(SAMPLES.iterdir())[:2]:
        gcs.upload(path, f"{root}/in/{path.name}")
    options = PipelineOptions([
        f"--input={root}/in/*", f"--output={root}/out", f"--model={root}/model", "--limit=2", *preflight.CANARY_OPTIONS,
        "--engine_profile=cpu-tiny", "--max_tokens=ocr=8", "--max_tokens=caption=8",
        f"--preflight_findings={root}/findings", f"--preflight_marker={MARKER}",
    ])
    # As run_dataflow.job_config, plus the checkpoint's shape: the CPU profile is sized from it (the accelerator
    # profiles the launcher plans are not).
    config = JobConfig.from_options(options, f"{root}/model", "tiny", True, CheckpointShape.read(f"{root}/model"))
    pipeline = beam.Pipeline(runner=make_runner(options), options=options)
    run_dataflow.build_job_graph(pipeline, config)
    assert pipeline.run().wait_until_finish() == "DONE"

    [found] = canary.read_findings(f"{root}/findings")
    assert found["marker"] == MARKER and found["pid"] == os.getpid()
    assert found["imports"]["errors"] == {} and found["imports"]["versions"]["vllm"]
    assert found["sdk_processes"]["pids"] == [os.getpid()] and found["sdk_processes"]["same_container"]
    assert found["engine_starts_s"] and all(seconds > 0 for seconds in found["engine_starts_s"])
    assert found["model"]["config_json"] and found["model"]["local"] != f"{root}/model"
    assert {k: found["bucket"][k] for k in ("write", "read_back", "delete")} == {"write": True, "read_back": True, "delete": True}
    assert found["bucket"]["identity"] is None  # no metadata server here
    assert found["xla_cache"] is None and found["summary"] == f"{root}/out/run_summary.json"

    summary = preflight._read_json(found["summary"])
    checks = preflight.evaluate(LOCAL, "JOB_STATE_DONE", [found], summary, LOG_LINE, MARKER)
    assert preflight.report(checks) == 0, capsys.readouterr()
    assert {c.name: c.ok for c in checks}["accelerator"] is None
    assert summary["counts"]["items"] == 2 and vision_batch  # the job itself ran: two items through the engine
