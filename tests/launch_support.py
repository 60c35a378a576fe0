"""Shared by the launch tests: an example deployment and an offline guard."""
from __future__ import annotations

import json
import pathlib
import socket

import pytest

from launch.deployment import Deployment

DEPLOYMENT = Deployment(project="my-project", region="us-east5", temp_location="gs://my-bucket/tmp", zone="us-east5-b")
DEPLOYMENT_FLAGS = ["--project=my-project", "--region=us-east5", "--zone=us-east5-b", "--temp_location=gs://my-bucket/tmp"]
USER_ARGS = ["--input=gs://my-bucket/in/**", "--output=gs://my-bucket/out/run1", "--model=gs://my-bucket/models/gemma"]


def go_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """No network, and credentials that never trigger an ADC lookup (FIELD-NOTES: ~20 s of retries)."""
    credentials = tmp_path / "adc.json"
    credentials.write_text(json.dumps({
        "type": "authorized_user", "client_id": "x", "client_secret": "x", "refresh_token": "x",
        "token": "x", "expiry": "2099-01-01T00:00:00Z",
    }))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "my-project")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during an offline test: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
