"""Submit the vision batch job to Dataflow TPU or GPU workers from a named launch profile.

    python -m launch.submit --profile tpu-v6e-1 \\
        --input 'gs://BUCKET/scans/**' --output gs://BUCKET/out/run1 --model gs://BUCKET/models/gemma-4-12B-it \\
        --project PROJECT --region us-east5 --zone us-east5-b --temp_location gs://BUCKET/tmp \\
        [--max_workers N] [--template [GCS_PATH]] [--warmup] [--dry-run] [more pipeline options]

The profile decides the worker shape (machine type <-> accelerator,
harness threads, disk, single SDK process), the engine profile, the image
budget and (TPU) the XLA compile-cache location; pipeline options after
the known flags are passed through (e.g. --tasks ocr --incremental_from ...).

Every invocation first builds the job graph for the DataflowRunner here,
offline, so option mistakes fail before anything is sent. Then:
  --dry-run   print the exact command (or launch request) and stop;
  --template  launch the flex template through the Dataflow API (works from
              any local Python: the graph is built on Dataflow's launcher);
  otherwise   submit directly from this process (Python 3.12 only, the
              workers' version) and return once Dataflow accepted the job.
--warmup runs the bundled samples on one worker to fill the compile cache (TPU).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from typing import Optional, Sequence

from launch import flex_launch, run_dataflow, warmup
from launch.accelerators import TPU
from launch.deployment import Deployment, add_deployment_args, deployment_from_args
from launch.job import Workers, effective_engine, plan_launch, timestamped_job_name
from launch.profiles import NOT_OFFERED, PROFILES, LaunchProfile, get_profile
from launch.shell import command_text
from schemas.uris import mask_credentials


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m launch.submit", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument(
        "--profile", required=True,
        help=f"launch profile: {', '.join(sorted(PROFILES))} (not offered: {', '.join(sorted(NOT_OFFERED))})",
    )
    parser.add_argument("--input", action="append", default=[], help="input glob (gs://); repeatable")
    parser.add_argument("--output", help="output location (gs://)")
    parser.add_argument("--model", required=True, help="Gemma 4 checkpoint in GCS (gs://...)")
    parser.add_argument("--max_workers", type=int, default=None, help="autoscaling ceiling (default: the profile's)")
    parser.add_argument(
        "--template", nargs="?", const="", default=None, metavar="GCS_PATH",
        help="launch through the flex template (default path: derived from --temp_location and setup.py's version)",
    )
    parser.add_argument("--warmup", action="store_true", help="fill the XLA compile cache: bundled samples, one worker")
    parser.add_argument("--dry-run", action="store_true", help="print what would be launched; send nothing")
    add_deployment_args(parser)
    return parser.parse_known_args(argv)


def job_inputs(
    args: argparse.Namespace, deployment: Deployment, profile: LaunchProfile, now: datetime.datetime
) -> tuple[list[str], str, Workers]:
    """(input globs, output, workers): the user's, or the warm-up's samples on one worker."""
    if args.warmup:
        if profile.platform != TPU:
            raise ValueError(f"--warmup fills the TPU XLA compile cache; {profile.name} runs on GPUs, which keep none")
        if args.input or args.output:
            raise ValueError("--warmup chooses its own --input (the bundled samples) and --output")
        return [warmup.samples_glob(deployment)], warmup.output_location(deployment, now), warmup.WARMUP_WORKERS
    if not args.input or not args.output:
        raise ValueError("--input and --output are required (or --warmup)")
    return args.input, args.output, Workers.batch(args.max_workers or profile.max_workers)


def print_dry_run(
    args: argparse.Namespace, deployment: Deployment, dataflow_args: Sequence[str], body: Optional[dict], engine: Sequence[str]
) -> None:
    """What would be launched, and the engine the workers will resolve; credentials in any URI masked."""
    lines = []
    if args.warmup:
        files = ", ".join(path.name for path in warmup.sample_files())
        lines.append(f"# would stage {files} to {warmup.samples_location(deployment)}/")
    if body is None:
        lines.append(command_text([sys.executable, "-m", "launch.run_dataflow", *dataflow_args]))
    else:
        lines.append(json.dumps(body, indent=2))
        lines.append(command_text(flex_launch.gcloud_run_command(deployment.project, deployment.region, body)))
    lines.extend(f"# workers' engine: {line}" for line in engine)
    lines.append("# dry run: nothing was staged or submitted")
    print(mask_credentials("\n".join(lines)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Beam logs every step of graph construction at INFO: noise around the command this prints.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    args, extra = parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        profile = get_profile(args.profile)
        deployment = deployment_from_args(args)
        inputs, output, workers = job_inputs(args, deployment, profile, now)
        user_args = [*(f"--input={pattern}" for pattern in inputs), f"--output={output}", f"--model={args.model}", *extra]
        if args.warmup:
            user_args.extend(warmup.PIPELINE_ARGS)
        job_name = timestamped_job_name(profile, now, purpose="warmup" if args.warmup else "run")
        launch = plan_launch(profile, deployment, workers, job_name, user_args)
    except ValueError as exc:  # UsageError, and the launch profile's refusals (worker shape, budgets)
        print(f"python -m launch.submit: error: {mask_credentials(str(exc))}", file=sys.stderr)
        return 2
    dataflow_args = launch.dataflow_args()

    started = time.monotonic()
    transforms = run_dataflow.build_offline(dataflow_args)
    print(f"# job graph: {transforms} transforms built for the DataflowRunner in {time.monotonic() - started:.1f} s")
    body = None
    if args.template is not None:
        body = flex_launch.launch_body(launch.settings, args.template or deployment.template_path(), launch.pipeline_args)
    if args.dry_run:
        print_dry_run(args, deployment, dataflow_args, body, effective_engine(profile, launch.pipeline_args).describe())
        return 0

    if args.warmup:
        warmup.stage_samples(deployment)
    if body is None:
        submitted = run_dataflow.submit(dataflow_args)
        print(f"launched {submitted.job_id}: https://console.cloud.google.com/dataflow/jobs/{deployment.region}/"
              f"{submitted.job_id}?project={deployment.project}")
    else:
        job_id = flex_launch.send(deployment.project, deployment.region, body)
        print(f"launched {job_id}: https://console.cloud.google.com/dataflow/jobs/{deployment.region}/{job_id}"
              f"?project={deployment.project}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
