"""Loaded first by subprocesses the launch tests start (on PYTHONPATH): every non-loopback connection fails.

The flex launcher test runs launch/run_dataflow.py as its own process, where a pytest monkeypatch cannot
reach; this keeps it provably offline (only the local GCS emulator is reachable).
"""
import socket

_connect = socket.socket.connect


def _loopback_only(self, address):
    if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
        raise ConnectionRefusedError(f"offline test: no connection to {address}")
    return _connect(self, address)


socket.socket.connect = _loopback_only
