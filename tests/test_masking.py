"""Credentials planted in URIs never come out: not in messages, request URLs, failure lines, dry runs or launch requests.

Every check greps what a user would see (stdout, stderr, log lines, launch artefacts) for the planted secrets.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch import submit
from launch.job import Workers, plan_launch
from launch.profiles import PROFILES
from schemas.uris import mask_credentials
from tests.launch_support import BUCKET, DEPLOYMENT, DEPLOYMENT_FLAGS, LOOPBACK_ONLY, ROOT, go_offline

SECRETS = ("hunter2", "TOK123", "SIG456")
PLANTED = f"gs://alice:hunter2@{BUCKET}/models/gemma-4?token=TOK123"


def assert_clean(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{secret} in: {text}"


@pytest.mark.parametrize(
    "text",
    [
        "cannot open gs://alice:hunter2@b/x.png?token=TOK123&sig=SIG456",
        "cannot open gs://alice:p@hunter2@b/x.png",  # a password holding '@'
        # Percent-encoded, as a URI quoted inside another URL.
        "https://console/x?src=gs%3A%2F%2Falice%3Ahunter2%40b%2Fx.png%3Ftoken%3DTOK123%26sig%3DSIG456",
        # The request URL google-cloud-storage puts in its errors: Beam kept the user-info in the bucket name,
        # and the object name carries the query, encoded.
        "ConnectionError: HTTPSConnectionPool(host='storage.googleapis.com', port=443): Max retries exceeded with url: "
        "/storage/v1/b/alice:hunter2@b/o/t.yaml%3Ftoken%3DTOK123?projection=noAcl&prettyPrint=false",
        "/storage/v1/b/alice%3Ahunter2%40b/o/t.yaml%3Fsig%3DSIG456",
    ],
)
def test_every_form_of_a_uri_is_masked(text):
    masked = mask_credentials(text)
    assert_clean(masked)
    assert "***" in masked


def test_ordinary_text_is_left_alone():
    for text in ("no uri here: user:pw", "/photos/icon@2x.png", "50% done", "gs://b/a%20b.png?generation=3"):
        assert mask_credentials(text) == text


def test_storage_failing_without_credentials_ends_in_our_one_line(tmp_path):
    """No default credentials, no network: Beam's credential retries used to print 4 tracebacks (48 lines)."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),  # no gcloud credentials there
        "PYTHONPATH": os.pathsep.join([str(LOOPBACK_ONLY), str(ROOT)]),  # every non-loopback connection refused
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.vision_batch", "--input", str(ROOT / "data" / "samples" / "receipt.png"),
         "--output", str(tmp_path / "out"), "--task_file", f"gs://alice:hunter2@{BUCKET}/tasks.yaml?token=TOK123",
         "--gcs_retry_timeout_s", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert_clean(done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"run failed: storage stat of gs://***@{BUCKET}/tasks.yaml?token=*** still failing")
    assert len(lines) <= 4, lines  # Beam's "no default credentials" warning (2 lines), then ours
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("template", [False, True], ids=["direct", "flex-template"])
def test_dry_runs_and_launch_requests_carry_no_credentials(monkeypatch, tmp_path, capsys, template):
    go_offline(monkeypatch, tmp_path)
    user = [f"--input=gs://alice:hunter2@{BUCKET}/in/**?sig=SIG456", f"--output=gs://{BUCKET}/out/run1", f"--model={PLANTED}",
            f"--incremental_from=gs://alice:hunter2@{BUCKET}/nightly/*"]
    flags = ["--profile", "gpu-l4", *user, *DEPLOYMENT_FLAGS, *(["--template"] if template else []), "--dry-run"]
    assert submit.main(flags) == 0
    captured = capsys.readouterr()
    assert_clean(captured.out, captured.err)
    model = f"gs://{BUCKET}/models/gemma-4?token=***"  # what the job is given: no user-info, the token masked
    if template:
        body = json.loads(captured.out[captured.out.index("{"): captured.out.index("\n}\n") + 2])
        assert body["launchParameter"]["parameters"]["model"] == model
    else:
        assert f"--model={model}" in captured.out
    # What would be sent, not only what is printed.
    launch = plan_launch(PROFILES["gpu-l4"], DEPLOYMENT, Workers.batch(1), "j", user)
    assert_clean(*launch.dataflow_args())


def test_a_refused_launch_masks_its_error_line(monkeypatch, tmp_path, capsys):
    go_offline(monkeypatch, tmp_path)
    flags = ["--profile", "gpu-l4", f"--input=gs://{BUCKET}/in/**", f"--output=gs://{BUCKET}/out/run1", f"--model={PLANTED}",
             *DEPLOYMENT_FLAGS, f"--task_file={tmp_path}/nowhere.yaml?token=TOK123", "--dry-run"]
    assert submit.main(flags) == 2
    captured = capsys.readouterr()
    assert_clean(captured.out, captured.err)
