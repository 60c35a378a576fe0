"""Shared by the launch tests: an example deployment, an offline guard, Google's flex launcher as a command line,
and a recording stand-in for the Dataflow jobs API."""
from __future__ import annotations

import http.server
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
from typing import Any, Iterator, Mapping, Sequence

import pytest

from launch.deployment import Deployment

BUCKET = "my-project-vision-batch"  # a legal bucket name, the docs' placeholder
DEPLOYMENT = Deployment(project="my-project", region="us-east5", temp_location=f"gs://{BUCKET}/tmp", zone="us-east5-b")
DEPLOYMENT_FLAGS = ["--project=my-project", "--region=us-east5", "--zone=us-east5-b", f"--temp_location=gs://{BUCKET}/tmp"]
MODEL = f"gs://{BUCKET}/models/gemma-4"
USER_ARGS = [f"--input=gs://{BUCKET}/in/**", f"--output=gs://{BUCKET}/out/run1", f"--model={MODEL}"]
ROOT = pathlib.Path(__file__).resolve().parent.parent
# sitecustomize.py refusing every non-loopback connection, for subprocesses (tests/loopback_only/).
LOOPBACK_ONLY = ROOT / "tests" / "loopback_only"


def fake_adc(directory: pathlib.Path) -> pathlib.Path:
    """An authorized_user ADC file whose token never expires: no ADC lookup, no real credentials.

    google-auth reads GOOGLE_APPLICATION_CREDENTIALS before any other source (google/auth/_default.py) and
    refreshes an authorized_user token only once its "expiry" has passed (google/oauth2/credentials.py).
    """
    path = directory / "adc.json"
    path.write_text(json.dumps({
        "type": "authorized_user", "client_id": "x", "client_secret": "x", "refresh_token": "x",
        "token": "x", "expiry": "2099-01-01T00:00:00Z",
    }))
    return path


def go_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, allow_loopback: bool = False) -> None:
    """No network (optionally loopback only, for local servers), and fake credentials."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(fake_adc(tmp_path)))
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "my-project")
    connect, create_connection = socket.socket.connect, socket.create_connection

    def loopback(address: Any) -> bool:
        return allow_loopback and isinstance(address, tuple) and address[0] in ("127.0.0.1", "localhost", "::1")

    def refuse_connect(self: socket.socket, address: Any) -> Any:
        if loopback(address):
            return connect(self, address)
        raise AssertionError(f"network access during an offline test: {address}")

    def refuse_create(address: Any, *args: Any, **kwargs: Any) -> Any:
        if loopback(address):
            return create_connection(address, *args, **kwargs)
        raise AssertionError(f"network access during an offline test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(socket, "create_connection", refuse_create)


# How the flex template launcher turns a launch request's FlexTemplateRuntimeEnvironment into pipeline options
# for the Python file (FLEX_TEMPLATE_PYTHON_PY_FILE). The launcher is closed source; this follows what its
# console logs show (a launcher log quoted in GoogleCloudPlatform DataflowTemplates troubleshooting material
# runs the template's main with --project --region --jobName --stagingLocation --templateLocation=
# <staging>/template_launches/<job id>/job_object --runner=DataflowRunner, the environment's settings such as
# --maxNumWorkers/--autoscalingAlgorithm, and every parameter as --name=value), in Beam Python's option names.
# Flex templates pass worker_accelerator as an additional experiment (Dataflow docs, "Run a pipeline with TPUs").
_ENVIRONMENT_OPTIONS = {
    "tempLocation": "temp_location",
    "stagingLocation": "staging_location",
    "machineType": "machine_type",
    "numWorkers": "num_workers",
    "maxWorkers": "max_num_workers",
    "workerZone": "worker_zone",
    "serviceAccountEmail": "service_account_email",
    "sdkContainerImage": "sdk_container_image",
    "diskSizeGb": "disk_size_gb",
}
_AUTOSCALING = {"AUTOSCALING_ALGORITHM_BASIC": "THROUGHPUT_BASED", "AUTOSCALING_ALGORITHM_NONE": "NONE"}


def job_object_location(staging_root: str, job_id: str) -> str:
    return f"{staging_root}/template_launches/{job_id}/job_object"


def launcher_argv(project: str, region: str, body: Mapping[str, Any], job_id: str) -> list[str]:
    """The command line the Python flex launcher gives FLEX_TEMPLATE_PYTHON_PY_FILE for this launch request."""
    launch = body["launchParameter"]
    environment = dict(launch["environment"])
    argv = [
        "--runner=DataflowRunner",
        f"--project={project}",
        f"--region={region}",
        f"--job_name={launch['jobName']}",
        f"--template_location={job_object_location(environment['stagingLocation'], job_id)}",
    ]
    for field, option in _ENVIRONMENT_OPTIONS.items():
        if field in environment:
            argv.append(f"--{option}={environment.pop(field)}")
    argv += [f"--experiments={experiment}" for experiment in environment.pop("additionalExperiments", [])]
    if "autoscalingAlgorithm" in environment:
        argv.append(f"--autoscaling_algorithm={_AUTOSCALING[environment.pop('autoscalingAlgorithm')]}")
    argv += [f"--{option}" for option in environment.pop("additionalPipelineOptions", [])]
    assert not environment, f"launch environment fields this launcher model does not translate: {sorted(environment)}"
    argv += [f"--{name}={value}" for name, value in launch["parameters"].items()]
    return argv


def run_launcher(
    script: pathlib.Path, argv: Sequence[str], storage_emulator: str, workdir: pathlib.Path
) -> subprocess.CompletedProcess:
    """`python <FLEX_TEMPLATE_PYTHON_PY_FILE> ARGS` in a fresh process, as the launcher VM runs it, against the GCS
    emulator with fake credentials and no network beyond loopback."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(workdir),
        # The launcher image installs the package (launch/flex_template/Dockerfile); here the worktree stands in.
        "PYTHONPATH": os.pathsep.join([str(LOOPBACK_ONLY), str(ROOT)]),
        "FLEX_TEMPLATE_PYTHON_PY_FILE": str(script),
        "STORAGE_EMULATOR_HOST": storage_emulator,
        "GOOGLE_APPLICATION_CREDENTIALS": str(fake_adc(workdir)),
    }
    return subprocess.run(
        [sys.executable, str(script), *argv], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )


class RecordingDataflow:
    """A loopback stand-in for the Dataflow jobs API (projects.locations.jobs.create, REST): records each
    request and answers with the job and an id, as the service does. Beam's client talks REST to an endpoint
    whose name contains "localhost" (apiclient.DataflowApplicationClient)."""

    JOB_ID = "2026-01-02_03_04_05-1234567890123456789"

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                recorder.requests.append((self.path, body))
                answer = json.dumps({**body, "id": recorder.JOB_ID, "currentState": "JOB_STATE_QUEUED"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://localhost:{self._server.server_address[1]}"

    def __enter__(self) -> "RecordingDataflow":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


def read_gcs(emulator: Any, uri: str) -> bytes:
    bucket, _, name = uri[len("gs://"):].partition("/")
    return emulator.client().bucket(bucket).blob(name).download_as_bytes()


def list_gcs(emulator: Any, prefix_uri: str) -> Iterator[str]:
    bucket, _, prefix = prefix_uri[len("gs://"):].partition("/")
    return (f"gs://{bucket}/{blob.name}" for blob in emulator.client().list_blobs(bucket, prefix=prefix))
