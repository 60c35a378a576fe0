"""The preflight's canary: the real job on a handful of items, and a probe that writes down what the worker saw.

`python -m launch.preflight` launches the job with `--preflight_findings=gs://.../findings`;
`launch.run_dataflow` then attaches `Probe` behind the job's run summary (a side input, so the
probe runs once the job's items are done, in a worker process that ran them: the canary has one
worker). The probe records facts, not verdicts, in one JSON file per worker process under
`--preflight_findings`; `launch.preflight` reads them back and judges them against the launch
profile. launch/canary_plugin.py, named in `--beam_plugins`, makes every worker process record its
engine start-up line from its first moment.

Facts recorded, each by a function that runs anywhere (the tests run them here for real):
- `image_imports`: the image's vLLM, Beam, torch and this package import, with their versions;
- `sdk_processes`: the Beam SDK harness processes of this machine, and whether they share this
  process's container (its mount namespace);
- `accelerator_holders`: which processes hold accelerator device files open (the TPU's
  /dev/vfio/N or /dev/accelN, a GPU's /dev/nvidiaN): one engine core must hold them, alone;
- `ENGINE_STARTS`: the engine's own "ready in N s" lines, as this process logged them (the probe holds the
  job's engine while it looks at the devices: a second, warm start when the job's was closed already);
- `xla_cache`: the persistent compile cache's entries in GCS, one read back;
- `bucket_round_trip`: an object written, read back and deleted under the findings prefix, as the
  worker's service account (named by the metadata server, where there is one);
- `model_staged`: the checkpoint's local copy (`engine.model_staging`) holds its config.json.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import logging
import os
import pathlib
import re
import socket
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from engine.api import EngineSettings
from engine.model_staging import stage_checkpoint
from engine.registry import process_engines
from library.storage import ROUND_TRIP_STEPS, round_trip, service_account

_LOG = logging.getLogger("launch.canary")
# Imported by every worker process before any bundle (--beam_plugins): it calls `install`.
PLUGIN = "launch.canary_plugin"
# The line the probe logs, which launch.preflight then looks for in Cloud Logging.
MARKER_LINE = "vision-batch preflight marker %s: worker %s pid %d"
# Modules the worker image must import: the engine, the SDK, and the job itself.
IMAGE_MODULES = ("vllm", "torch", "apache_beam", "pipelines.vision_batch")
# The Python SDK harness Beam's boot program starts, one per SDK process (apache/beam
# sdks/python/container/boot.go runs `python -m apache_beam.runners.worker.sdk_worker_main`).
SDK_HARNESS_MODULE = "apache_beam.runners.worker.sdk_worker_main"
# Accelerator device files: a TPU through VFIO (/dev/vfio/N; "open(/dev/vfio/0): Device or resource busy" when a
# second process tries) or the accel driver (/dev/accelN), an NVIDIA GPU as /dev/nvidiaN (not nvidiactl/-uvm,
# which every CUDA process opens).
ACCELERATOR_DEVICES = ("/dev/vfio/[0-9]*", "/dev/accel[0-9]*", "/dev/nvidia[0-9]*")
# The engine's start-up line (engine/local.py: "vLLM engine for %s ready in %.1f s").
_READY = re.compile(r"\bready in ([0-9]+(?:\.[0-9]+)?) s\b")


class CanaryOptions(PipelineOptions):
    """Set only by launch.preflight: a job with --preflight_findings is a canary."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--preflight_findings", default=None,
            help="Preflight canary only (python -m launch.preflight): gs:// prefix where the probe writes what each "
                 "worker saw.",
        )
        parser.add_argument(
            "--preflight_marker", default=None,
            help="Preflight canary only: the token the probe logs, which the preflight looks up in Cloud Logging.",
        )


# ---- the engine's start-up, as this process logged it -------------------------------------------------------

ENGINE_STARTS: list[float] = []


class _EngineStarts(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        match = _READY.search(record.getMessage())
        if match:
            ENGINE_STARTS.append(float(match.group(1)))


def install() -> None:
    """Record every engine start-up line of this process from now on (idempotent)."""
    logger = logging.getLogger("engine.local")
    if not any(isinstance(handler, _EngineStarts) for handler in logger.handlers):
        logger.addHandler(_EngineStarts())
    # The line is INFO; a canary wants it whatever the worker's log level (it shows in the worker log too).
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


def add_worker_plugin(options: PipelineOptions) -> None:
    """Have every worker process import this module (and so `install`) before any bundle, as library.storage does."""
    setup = options.view_as(SetupOptions)
    setup.beam_plugins = sorted({*(setup.beam_plugins or ()), PLUGIN})


# ---- facts -----------------------------------------------------------------------------------------------

def image_imports(modules: Sequence[str] = IMAGE_MODULES) -> dict[str, Any]:
    versions: dict[str, Optional[str]] = {}
    errors: dict[str, str] = {}
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure is the finding
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        versions[name] = getattr(module, "__version__", None)
    return {"versions": versions, "errors": errors}


def _pids(proc: pathlib.Path) -> Iterator[int]:
    for entry in proc.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _link(path: pathlib.Path) -> Optional[str]:
    try:
        return os.readlink(path)
    except OSError:  # gone, or another user's process
        return None


def _parent(proc: pathlib.Path, pid: int) -> Optional[int]:
    try:  # /proc/PID/stat: "pid (comm) state ppid ...", comm may hold spaces and parentheses
        return int((proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def sdk_processes(proc: pathlib.Path = pathlib.Path("/proc"), harness: str = SDK_HARNESS_MODULE) -> dict[str, Any]:
    """The SDK harness processes this machine runs (this one always counts: the probe runs in an SDK process;
    a local runner's harness is the launching process itself), and whether all share this one's container.

    A harness's own children are not harnesses, though a forked one (vLLM's engine core, unless something forces
    spawn) shows its parent's command line: processes whose parent is a harness are left out."""
    own = os.getpid()
    own_namespace = _link(proc / str(own) / "ns" / "mnt")
    candidates: set[int] = {own}
    for pid in _pids(proc):
        try:
            command = (proc / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if harness in command:
            candidates.add(pid)
    found = {pid: _link(proc / str(pid) / "ns" / "mnt") for pid in candidates
             if pid == own or _parent(proc, pid) not in candidates}
    return {
        "pids": sorted(found),
        "this_pid": own,
        # None when a namespace cannot be read (another user's process): not shown to be shared.
        "same_container": all(namespace is not None and namespace == own_namespace for namespace in found.values()),
    }


def accelerator_holders(
    patterns: Sequence[str] = ACCELERATOR_DEVICES, proc: pathlib.Path = pathlib.Path("/proc")
) -> dict[str, list[int]]:
    """Accelerator device file -> the processes holding it open (from /proc/PID/fd, which `lsof` reads too)."""
    devices = {os.path.realpath(path) for pattern in patterns for path in glob.glob(pattern)}
    holders: dict[str, set[int]] = {device: set() for device in devices}
    if not devices:
        return {}
    for pid in _pids(proc):
        try:
            fds = list((proc / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            target = _link(fd)
            if target in holders:
                holders[target].add(pid)
    return {device: sorted(pids) for device, pids in sorted(holders.items())}


def _objects(prefix: str) -> list[Any]:
    [result] = FileSystems.match([prefix.rstrip("/") + "/**"])
    return list(result.metadata_list)


def xla_cache(path: Optional[str]) -> Optional[dict[str, Any]]:
    """The cache's entries (count, bytes, newest write) and one read back whole; None without a cache (GPU, CPU)."""
    if not path:
        return None
    try:
        entries = _objects(path)
        facts: dict[str, Any] = {
            "path": path, "entries": len(entries), "bytes": sum(entry.size_in_bytes for entry in entries),
            "newest_write": max((entry.last_updated_in_seconds for entry in entries), default=None),
            "read_back": None,
        }
        if entries:
            smallest = min(entries, key=lambda entry: entry.size_in_bytes)
            with FileSystems.open(smallest.path) as handle:
                facts["read_back"] = len(handle.read()) == smallest.size_in_bytes
        return facts
    except Exception as exc:  # noqa: BLE001 - the finding is that the cache cannot be listed or read
        return {"path": path, "error": f"{type(exc).__name__}: {exc}"}


def bucket_round_trip(prefix: str, name: str) -> dict[str, Any]:
    """Write, read back and delete one object under `prefix` with this process's credentials."""
    uri = f"{prefix.rstrip('/')}/{name}"
    done, error = round_trip(uri, f"vision-batch preflight {name} {time.time()}".encode())
    return {"uri": uri, **{step: step in done for step in ROUND_TRIP_STEPS},
            "error": f"{type(error).__name__}: {error}" if error is not None else None}


def model_staged(model_path: str) -> dict[str, Any]:
    """The checkpoint as the engine staged it (a second call returns the local copy at once)."""
    try:
        local = pathlib.Path(stage_checkpoint(model_path))
        files = [path for path in local.rglob("*") if path.is_file()]
        return {"uri": model_path, "local": str(local), "config_json": (local / "config.json").is_file(),
                "files": len(files), "bytes": sum(path.stat().st_size for path in files), "error": None}
    except Exception as exc:  # noqa: BLE001 - the finding is that staging failed
        return {"uri": model_path, "local": None, "config_json": False, "error": f"{type(exc).__name__}: {exc}"}


# ---- the probe ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    findings: str  # gs:// prefix (or a local folder in tests)
    marker: str
    engine: EngineSettings


class Probe(beam.DoFn):
    """Runs after the job's summary (side input `summary`); writes this worker process's findings."""

    def __init__(self, settings: ProbeSettings):
        self._settings = settings

    def setup(self) -> None:
        install()

    def _held_accelerator(self) -> dict[str, list[int]]:
        """Device holders while this process holds the job's engine: the job's own if it is still up, else a new one
        (the job's DoFns, and with them the engine, may be torn down by now; a second start reads the XLA cache the
        first one wrote, and its start-up line is recorded too)."""
        engines = process_engines()
        engine = engines.acquire(self._settings.engine)
        try:
            return accelerator_holders()
        finally:
            engines.release(engine)

    def process(self, _: Any, summary: Any) -> Iterator[str]:
        settings = self._settings
        host, pid = socket.gethostname(), os.getpid()
        findings = {
            "marker": settings.marker,
            "host": host,
            "pid": pid,
            "summary": summary,
            "imports": image_imports(),
            "sdk_processes": sdk_processes(),
            "accelerator_holders": self._held_accelerator(),
            "engine_starts_s": list(ENGINE_STARTS),
            "xla_cache": xla_cache(settings.engine.xla_cache_path),
            "bucket": {**bucket_round_trip(settings.findings, f"round-trip-{host}-{pid}"),
                       "identity": service_account()},
            "model": model_staged(settings.engine.model_path),
        }
        uri = f"{settings.findings.rstrip('/')}/{host}-{pid}.json"
        with FileSystems.create(uri) as handle:
            handle.write(json.dumps(findings, indent=2, sort_keys=True, default=str).encode())
        # WARNING: above every log-level filter a worker may run with; launch.preflight looks it up in Cloud Logging.
        _LOG.warning(MARKER_LINE, settings.marker, host, pid)
        yield uri


def attach(pipeline: beam.Pipeline, summary: beam.PCollection, engine: EngineSettings) -> Optional[beam.PCollection]:
    """The probe behind the job's summary, when the options ask for a canary; None otherwise."""
    options = pipeline.options.view_as(CanaryOptions)
    if not options.preflight_findings:
        return None
    if not options.preflight_marker:
        raise ValueError("--preflight_findings needs --preflight_marker (launch.preflight sets both)")
    add_worker_plugin(pipeline.options)
    settings = ProbeSettings(options.preflight_findings, options.preflight_marker, engine)
    return (
        pipeline
        | "PreflightSeed" >> beam.Create([None])
        | "PreflightProbe" >> beam.ParDo(Probe(settings), summary=beam.pvalue.AsSingleton(summary))
    )


def read_findings(prefix: str) -> list[Mapping[str, Any]]:
    """Every worker process's findings under `prefix` (launch.preflight, tests)."""
    [result] = FileSystems.match([prefix.rstrip("/") + "/*.json"])
    findings = []
    for entry in sorted(result.metadata_list, key=lambda entry: entry.path):
        with FileSystems.open(entry.path) as handle:
            findings.append(json.loads(handle.read()))
    return findings

