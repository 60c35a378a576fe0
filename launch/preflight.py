"""Check a project once before paying for a night: a short canary job with the real worker image and profile.

    python -m launch.preflight --profile tpu-v6e-1 --project PROJECT --region us-east5 --zone us-east5-b \\
        --temp_location gs://BUCKET/tmp --service_account_email WORKER_SA [--model gs://BUCKET/models/M] \\
        [--items 4] [--template [GCS_PATH]] [--dry-run] [more pipeline options]

It stages the bundled samples (and, without --model, the project's tiny random-weight checkpoint) to
gs://BUCKET/vision-batch/, launches the job on them with the launch profile's worker, image, engine
and XLA cache, on one worker, plus a probe that records what that worker saw (launch/canary.py),
waits for the job, looks up the probe's marker line in Cloud Logging, and prints one table: image
imports, the accelerator held by exactly one engine core, SDK processes per VM and whether they
share a container, engine start time, the XLA cache written and read back, bucket read/write as
the worker service account, the model staged, the worker log line in Cloud Logging, and the
canary's items/s. Exit code 0 when every check passed; 1 naming the first that failed; 2 for a
usage error (nothing launched).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import time
import uuid
from typing import Any, Callable, Mapping, Optional, Sequence

from apache_beam.io.filesystems import FileSystems

from launch import canary, flex_launch, run_dataflow, warmup
from launch.accelerators import TPU
from launch.deployment import Deployment, add_deployment_args, deployment_from_args
from launch.job import Launch, Workers, plan_launch, timestamped_job_name
from launch.profiles import PROFILES, LaunchProfile, get_profile
from launch.shell import command_text
from schemas.uris import mask_credentials
from tiny_model.checkpoint import BUILDER_VERSION, DEFAULT_PRESET, ensure_checkpoint

# One worker, no autoscaling: every fact is about one VM, and one worker is the cheapest canary.
CANARY_WORKERS = Workers(initial=1, maximum=1, autoscaling="NONE")
# A handful of the bundled samples (images, a TIFF, PDF pages).
DEFAULT_ITEMS = 4
# Text tasks and no error budget: a random-weight checkpoint answers nonsense, which must not fail the job
# (the probe runs after the run summary, and a run over its error budget fails the summary step on Dataflow).
CANARY_OPTIONS = ("--tasks=ocr,caption", "--max_error_fraction=1.0")
# Terminal Dataflow job states (Dataflow REST reference, projects.jobs, JobState).
TERMINAL_STATES = {"JOB_STATE_DONE", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_UPDATED", "JOB_STATE_DRAINED",
                   "JOB_STATE_STOPPED"}
# Cloud Logging API v2, entries.list (REST reference: POST https://logging.googleapis.com/v2/entries:list).
LOGGING_URL = "https://logging.googleapis.com/v2/entries:list"
LOGGING_SCOPE = "https://www.googleapis.com/auth/logging.read"
# Worker log entries of a Dataflow job carry the monitored resource dataflow_step with the job's id as a label
# (Dataflow docs, "Work with pipeline logs"; the Logs Explorer query the job page links to; apache/beam
# runners/google-cloud-dataflow-java/worker/.../logging/DataflowWorkerLoggingHandler.java writes its entries so).
# A bare quoted string in the Logging query language matches any field of the entry (Cloud Logging, "Logging
# query language"), and the filter names no payload field on purpose: a Python record reaches Dataflow as a Fn API
# LogEntry holding only severity, message (the record's text, plus its traceback: the handler has no formatter),
# thread, log_location ("pathname:lineno"), timestamp, trace, instruction and transform ids (apache/beam 2.77
# sdks/python/apache_beam/runners/worker/log_handler.py, FnApiLogRecordHandler.emit; sdk_worker_main.py installs
# it on the root logger). The logger's name (`engine.output`, `launch.canary`) is not sent at all, and how Runner
# v2's harness (Dataflow's own, not in Beam's source) lays the entry out is not public: jsonPayload.message under
# the log dataflow.googleapis.com/worker is how Beam's Java worker writes its own entries and what spotify/klio
# lib/src/klio/metrics/stackdriver.py filters Python workers' lines by, not a documented guarantee. The text,
# which every layout carries, is what is searched; docs/operations.md gives operators this same filter.
LOG_FILTER = 'resource.type="dataflow_step" AND resource.labels.job_id="{job_id}" AND "{marker}"'
# Worker logs reach Cloud Logging seconds to a minute after they are written: look a few times.
LOG_ATTEMPTS, LOG_WAIT_S = 6, 20.0


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: Optional[bool]  # None: does not apply to this profile
    detail: str


@dataclasses.dataclass(frozen=True)
class Expectations:
    """What the launch profile promises about its worker."""

    accelerator: bool  # a TPU or GPU the engine must hold
    xla_cache: bool  # TPU: a persistent compile cache
    sdk_processes: int  # per VM: 1, or one per vCPU where several processes feed one engine core

    @staticmethod
    def of(profile: LaunchProfile, launch: Launch) -> "Expectations":
        feeders = next((int(a.split("=", 1)[1]) for a in launch.pipeline_args if a.startswith("--host_feeders=")), 1)
        return Expectations(accelerator=True, xla_cache=profile.platform == TPU, sdk_processes=feeders)


# ---- judging the findings -----------------------------------------------------------------------------------

def _imports(found: Mapping[str, Any]) -> Check:
    imports = found["imports"]
    versions = ", ".join(f"{name} {version or '?'}" for name, version in imports["versions"].items())
    if imports["errors"]:
        return Check("image imports", False, "; ".join(f"{name}: {error}" for name, error in imports["errors"].items()))
    return Check("image imports", True, versions)


def _accelerator(found: Mapping[str, Any], expect: Expectations) -> Check:
    holders = found["accelerator_holders"]
    if not expect.accelerator:
        return Check("accelerator", None, "no accelerator on this profile")
    if not holders:
        return Check("accelerator", False, "no accelerator device file on the worker (/dev/vfio, /dev/accel, /dev/nvidia): "
                                           "the worker has no accelerator attached")
    pids = sorted({pid for held in holders.values() for pid in held})
    devices = ", ".join(holders)
    if len(pids) == 1:
        return Check("accelerator", True, f"{devices} held by one process (pid {pids[0]})")
    if not pids:
        return Check("accelerator", False, f"nobody holds {devices}: the engine did not open the accelerator")
    return Check("accelerator", False, f"{devices} held by {len(pids)} processes (pids {pids}): more than one engine "
                                       "core; check --experiments=no_use_multiple_sdk_containers")


def _sdk_processes(found: Mapping[str, Any], expect: Expectations) -> Check:
    processes = found["sdk_processes"]
    count, shared = len(processes["pids"]), processes["same_container"]
    detail = f"{count} SDK process(es) on the VM, {'one container' if shared else 'NOT one container'}; expected {expect.sdk_processes}"
    return Check("SDK processes per VM", count == expect.sdk_processes and shared, detail)


def _engine_start(found: Mapping[str, Any]) -> Check:
    starts = found["engine_starts_s"]
    if not starts:
        return Check("engine start", False, "no 'vLLM engine ... ready in N s' line in the probe's process")
    if len(starts) == 1:
        return Check("engine start", True, f"ready in {starts[0]:.1f} s")
    # The probe started the engine again after the job's had closed: the second start read the first one's cache.
    return Check("engine start", True, f"ready in {starts[0]:.1f} s; started again in {starts[-1]:.1f} s (warm)")


def _xla_cache(found: Mapping[str, Any], expect: Expectations) -> Check:
    cache = found["xla_cache"]
    if not expect.xla_cache:
        return Check("XLA cache", None, "no persistent compile cache on this platform")
    if cache is None:
        return Check("XLA cache", False, "the job ran without --xla_cache_path")
    if cache.get("error"):
        return Check("XLA cache", False, f"{cache['path']}: {cache['error']}")
    if not cache["entries"]:
        return Check("XLA cache", False, f"nothing written to {cache['path']}: the compiled programs stayed on the "
                                         "worker's disk (a gs:// cache needs GCS support in the image)")
    if not cache["read_back"]:
        return Check("XLA cache", False, f"{cache['entries']} entries in {cache['path']}, one could not be read back whole")
    return Check("XLA cache", True, f"{cache['entries']} entries, {cache['bytes'] / 1e6:.1f} MB in {cache['path']}, read back")


def _bucket(found: Mapping[str, Any]) -> Check:
    bucket = found["bucket"]
    who = bucket.get("identity") or "the worker's credentials (service account not named: no metadata server)"
    steps = [step for step in ("write", "read_back", "delete") if not bucket[step]]
    if steps:
        return Check("bucket read/write", False, f"{steps[0].replace('_', ' ')} of {bucket['uri']} failed as {who}: "
                                                 f"{bucket.get('error') or 'content differed'}")
    return Check("bucket read/write", True, f"write, read back, delete as {who}")


def _model(found: Mapping[str, Any]) -> Check:
    model = found["model"]
    if model.get("error") or not model["config_json"]:
        return Check("model staged", False, f"{model['uri']}: {model.get('error') or 'no config.json in the staged copy'}")
    return Check("model staged", True, f"{model['files']} files, {model['bytes'] / 1e6:.1f} MB at {model['local']}")


def _log(log_line: Optional[str], marker: str) -> Check:
    if log_line is None:
        return Check("worker log in Cloud Logging", False, f"no worker log entry with {marker}: the worker service "
                                                           "account needs roles/logging.logWriter (roles/dataflow.worker has it)")
    return Check("worker log in Cloud Logging", True, log_line.strip())


def _rate(summary: Optional[Mapping[str, Any]]) -> Check:
    if summary is None:
        return Check("canary items/s", False, "no run_summary.json: the canary job did not finish")
    items, wall = summary["counts"]["items"], summary["wall_time_s"]
    detail = f"{items} items in {wall:.0f} s of job time ({items / max(wall, 1e-9):.3f} items/s, worker start-up included)"
    return Check("canary items/s", summary["state"] == "SUCCEEDED" and items > 0, f"{detail}; run {summary['state']}")


def evaluate(
    expect: Expectations, job_state: str, findings: Sequence[Mapping[str, Any]], summary: Optional[Mapping[str, Any]],
    log_line: Optional[str], marker: str,
) -> list[Check]:
    """The table's rows, in order, from what the canary left behind."""
    checks = [Check("canary job", job_state == "JOB_STATE_DONE", job_state)]
    worker_checks = ("image imports", "accelerator", "SDK processes per VM", "engine start", "XLA cache",
                     "bucket read/write", "model staged")
    if not findings:
        checks += [Check(name, False, "no findings: the probe never ran (read the job's worker logs)") for name in worker_checks]
    else:
        found = findings[0]  # one probe element: one worker process of the one worker
        checks += [_imports(found), _accelerator(found, expect), _sdk_processes(found, expect), _engine_start(found),
                   _xla_cache(found, expect), _bucket(found), _model(found)]
    return checks + [_log(log_line, marker), _rate(summary)]


def render(checks: Sequence[Check]) -> str:
    status = {True: "ok", False: "FAILED", None: "n/a"}
    width = max(len(check.name) for check in checks)
    return "\n".join(f"{check.name:<{width}}  {status[check.ok]:<6}  {check.detail}" for check in checks)


def first_failure(checks: Sequence[Check]) -> Optional[Check]:
    return next((check for check in checks if check.ok is False), None)


# ---- Cloud Logging ---------------------------------------------------------------------------------------

def _entry_text(entry: Mapping[str, Any]) -> str:
    """A LogEntry's text: Python worker logs carry it in jsonPayload.message, others in textPayload."""
    return entry.get("textPayload") or (entry.get("jsonPayload") or {}).get("message", "")


def log_request(project: str, job_id: str, marker: str) -> dict[str, Any]:
    return {"resourceNames": [f"projects/{project}"], "filter": LOG_FILTER.format(job_id=job_id, marker=marker),
            "orderBy": "timestamp desc", "pageSize": 10}


def find_log_line(project: str, job_id: str, marker: str, session: Any = None,
                  attempts: int = LOG_ATTEMPTS, wait_s: float = LOG_WAIT_S) -> Optional[str]:
    """The worker's marker line as Cloud Logging has it, or None. `session`: an authorized requests session
    (default: Application Default Credentials through google-auth; google-cloud-logging is not a dependency)."""
    if session is None:
        import google.auth
        from google.auth.transport.requests import AuthorizedSession

        credentials, _ = google.auth.default(scopes=[LOGGING_SCOPE])
        session = AuthorizedSession(credentials)
    for attempt in range(attempts):
        response = session.post(LOGGING_URL, json=log_request(project, job_id, marker), timeout=60)
        response.raise_for_status()
        for entry in response.json().get("entries", []):
            if marker in _entry_text(entry):
                return _entry_text(entry)
        if attempt + 1 < attempts:
            time.sleep(wait_s)
    return None


# ---- the job ---------------------------------------------------------------------------------------------

def wait_for_job(project: str, region: str, job_id: str, timeout_s: float, poll_s: float = 30.0) -> str:
    """The job's terminal state (or its state when `timeout_s` ran out)."""
    from google.cloud import dataflow_v1beta3

    client = dataflow_v1beta3.JobsV1Beta3Client()
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get_job(request={"project_id": project, "location": region, "job_id": job_id})
        state = job.current_state.name
        if state in TERMINAL_STATES or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


def _read_json(uri: str) -> Optional[dict[str, Any]]:
    if not FileSystems.exists(uri):
        return None
    with FileSystems.open(uri) as handle:
        return json.loads(handle.read())


def tiny_model_location(deployment: Deployment) -> str:
    """Where the tiny random-weight checkpoint goes in the bucket (workers read only GCS)."""
    return f"{deployment.bucket_root}/preflight/models/{DEFAULT_PRESET}-{BUILDER_VERSION}"


def stage_tiny_model(deployment: Deployment) -> str:
    """Build the tiny checkpoint here once (cached) and copy it to `tiny_model_location` unless it is there."""
    local, target = ensure_checkpoint(DEFAULT_PRESET), tiny_model_location(deployment)
    if not FileSystems.exists(f"{target}/config.json"):
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            with FileSystems.create(f"{target}/{path.relative_to(local).as_posix()}") as handle:
                handle.write(path.read_bytes())
    return target


@dataclasses.dataclass(frozen=True)
class Canary:
    launch: Launch
    findings: str
    output: str
    marker: str


def plan_canary(
    profile: LaunchProfile, deployment: Deployment, model: str, items: int, extra: Sequence[str], now: datetime.datetime
) -> Canary:
    run = f"{now:%Y%m%d-%H%M%S}"
    root = f"{deployment.bucket_root}/preflight/runs/{run}"
    marker = f"vb-preflight-{run}-{uuid.uuid4().hex[:6]}"
    user_args = [
        f"--input={warmup.samples_glob(deployment)}", f"--output={root}/output", f"--model={model}", f"--limit={items}",
        *CANARY_OPTIONS, f"--preflight_findings={root}/findings", f"--preflight_marker={marker}", *extra,
    ]
    launch = plan_launch(profile, deployment, CANARY_WORKERS, timestamped_job_name(profile, now, "preflight"), user_args)
    return Canary(launch, f"{root}/findings", f"{root}/output", marker)


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m launch.preflight", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--profile", required=True, help=f"launch profile: {', '.join(sorted(PROFILES))}")
    parser.add_argument("--model", default=None, help="checkpoint in GCS (default: the tiny random-weight checkpoint, staged)")
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS, help=f"items of the bundled samples (default {DEFAULT_ITEMS})")
    parser.add_argument(
        "--template", nargs="?", const="", default=None, metavar="GCS_PATH",
        help="launch through the flex template (default path: derived from --temp_location and setup.py's version)",
    )
    parser.add_argument("--timeout_s", type=float, default=3 * 3600.0, help="give up waiting for the job after this long")
    parser.add_argument("--dry-run", action="store_true", help="print what would be launched; send nothing")
    add_deployment_args(parser)
    return parser.parse_known_args(argv)


def main(argv: Optional[Sequence[str]] = None, find_log: Callable[..., Optional[str]] = find_log_line) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    args, extra = parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        profile = get_profile(args.profile)
        deployment = deployment_from_args(args)
        if args.items < 1:
            raise ValueError("--items must be at least 1")
        if args.model is None and deployment.cache_root is None:
            # The tiny checkpoint's compiled programs are of no use to real jobs: keep them out of their cache.
            deployment = dataclasses.replace(deployment, cache_root=f"{deployment.bucket_root}/preflight/xla-cache")
        planned = plan_canary(profile, deployment, args.model or tiny_model_location(deployment), args.items, extra, now)
    except ValueError as exc:
        print(f"python -m launch.preflight: error: {mask_credentials(str(exc))}", file=sys.stderr)
        return 2
    transforms = run_dataflow.build_offline(planned.launch.dataflow_args())
    print(f"# canary job graph: {transforms} transforms built for the DataflowRunner")
    if args.dry_run:
        body = None
        if args.template is not None:
            body = flex_launch.launch_body(planned.launch.settings, args.template or deployment.template_path(),
                                           planned.launch.pipeline_args)
        staged = ", ".join(path.name for path in warmup.sample_files())
        print(f"# would stage {staged} to {warmup.samples_location(deployment)}/"
              + ("" if args.model else f" and the tiny checkpoint to {tiny_model_location(deployment)}/"))
        print(mask_credentials(json.dumps(body, indent=2) if body else command_text(
            [sys.executable, "-m", "launch.run_dataflow", *planned.launch.dataflow_args()])))
        print(f"# then: wait for the job, read {planned.findings}/, look up {planned.marker} in Cloud Logging")
        print("# dry run: nothing was staged or submitted")
        return 0

    warmup.stage_samples(deployment)
    if args.model is None:
        stage_tiny_model(deployment)
    if args.template is not None:
        body = flex_launch.launch_body(planned.launch.settings, args.template or deployment.template_path(),
                                       planned.launch.pipeline_args)
        job_id = flex_launch.send(deployment.project, deployment.region, body)
    else:
        job_id = run_dataflow.submit(planned.launch.dataflow_args()).job_id
    print(f"canary {job_id}: https://console.cloud.google.com/dataflow/jobs/{deployment.region}/{job_id}"
          f"?project={deployment.project}; waiting for it (worker start-up takes minutes)")
    state = wait_for_job(deployment.project, deployment.region, job_id, args.timeout_s)
    checks = evaluate(
        Expectations.of(profile, planned.launch), state, canary.read_findings(planned.findings),
        _read_json(f"{planned.output}/run_summary.json"), find_log(deployment.project, job_id, planned.marker),
        planned.marker,
    )
    return report(checks)


def report(checks: Sequence[Check]) -> int:
    """Print the table; 0 when nothing failed, else 1 and the first failed check named."""
    print(render(checks))
    failed = first_failure(checks)
    if failed is None:
        print("preflight passed")
        return 0
    print(f"preflight failed: {failed.name}: {failed.detail}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
