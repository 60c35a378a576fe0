"""A real local GCS server for tests: gcp-storage-emulator on 127.0.0.1.

Beam's own GCS filesystem and google-cloud-storage reach it through
STORAGE_EMULATOR_HOST. A fake never-expiring ADC file keeps real
credentials out of the tests and avoids Beam's ~20 s credential lookup in
every process.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Iterator

import pytest

BUCKET = "vision-batch-test"
SERVER = pathlib.Path(__file__).with_name("gcs_emulator_server.py")  # the emulator, answering lost uploads as GCS does


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(port: int, process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("gcp-storage-emulator did not start")


@dataclasses.dataclass
class GcsEmulator:
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        # Straight to the emulator, even while STORAGE_EMULATOR_HOST points the job at a fault proxy.
        return storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.endpoint})

    def upload(self, local: pathlib.Path, uri: str) -> str:
        """Upload a file, or a directory tree under the prefix `uri`."""
        bucket_name, _, prefix = uri[len("gs://"):].partition("/")
        bucket = self.client().bucket(bucket_name)
        paths = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for path in paths:
            name = prefix if local.is_file() else f"{prefix.rstrip('/')}/{path.relative_to(local).as_posix()}"
            bucket.blob(name).upload_from_filename(str(path))
        return uri

    def arrow_filesystem(self):
        """pyarrow's own GCS filesystem, for reading results back independently of Beam."""
        from pyarrow import fs

        return fs.GcsFileSystem(anonymous=True, endpoint_override=f"127.0.0.1:{self.port}", scheme="http")


@pytest.fixture(scope="session")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    port = _free_port()
    adc = tmp_path_factory.mktemp("adc") / "fake_adc.json"
    adc.write_text(json.dumps({
        "type": "authorized_user", "client_id": "fake", "client_secret": "fake", "refresh_token": "fake",
        "token": "fake-token", "expiry": "2099-01-01T00:00:00Z",
    }))
    saved = {key: os.environ.get(key) for key in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")}
    os.environ.update(
        STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}",
        GOOGLE_APPLICATION_CREDENTIALS=str(adc),
        GOOGLE_CLOUD_PROJECT="test",
    )
    process = subprocess.Popen(
        [sys.executable, str(SERVER), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(port, process)
        emulator = GcsEmulator(port)
        emulator.client().create_bucket(BUCKET)
        yield emulator
    finally:
        process.terminate()
        process.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
