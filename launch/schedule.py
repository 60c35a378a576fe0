"""Nightly schedule: a Cloud Scheduler job that launches the flex template every night.

    python -m launch.schedule --profile tpu-v6e-1 --input 'gs://BUCKET/incoming/**' \\
        --output_root gs://BUCKET/nightly --model gs://BUCKET/models/gemma-4-12B-it \\
        --project PROJECT --region us-east5 --zone us-east5-b --temp_location gs://BUCKET/tmp \\
        --scheduler_service_account launcher@PROJECT.iam.gserviceaccount.com \\
        [--schedule '0 2 * * *'] [--time_zone Etc/UTC] [--write DIR] [more pipeline options]

Each night's job writes to OUTPUT_ROOT/{date} (the launcher expands {date}
to the UTC date) and, with --incremental_from OUTPUT_ROOT/*, skips every
(content, task, model, prompt version) an earlier night already answered:
only new or changed inputs reach the accelerators. The job name is fixed,
and Dataflow refuses a job named like one still running in the region, so
a slow night never overlaps the next.

Prints (and with --write, writes DIR/nightly-PROFILE.json) the
`flexTemplates:launch` body that Cloud Scheduler posts, then the gcloud
commands that grant the scheduler's (and the workers') service accounts
their roles and create the job, then the alerting policies that notify you
when a night fails or its launch is refused (with --write, as
DIR/alert-*-PROFILE.json). launch/composer/ launches the same body from
Composer.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Optional, Sequence

from launch import flex_launch, run_dataflow
from launch.deployment import Deployment, add_deployment_args, deployment_from_args
from launch.job import Workers, plan_launch
from launch.profiles import PROFILES, LaunchProfile, get_profile
from launch.run_dataflow import DATE_PLACEHOLDER
from launch.shell import command_text

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# 02:00 daily; launch/composer/vision_batch_nightly.py's DAG uses the same cron, so both paths date a night alike.
DEFAULT_SCHEDULE = "0 2 * * *"


def scheduler_job_name(profile: LaunchProfile) -> str:
    return f"vision-batch-nightly-{profile.name}"


def nightly_body(
    profile: LaunchProfile, deployment: Deployment, input_glob: str, output_root: str, model: str, extra: Sequence[str]
) -> dict[str, Any]:
    """The launch body; its pipeline options are first built into a graph offline, like any submit."""
    root = output_root.rstrip("/")
    user_args = [
        f"--input={input_glob}",
        f"--output={root}/{DATE_PLACEHOLDER}",
        f"--incremental_from={root}/*",
        f"--model={model}",
        *extra,
    ]
    workers = Workers.batch(profile.max_workers)
    launch = plan_launch(profile, deployment, workers, scheduler_job_name(profile), user_args)
    run_dataflow.build_offline(launch.dataflow_args())
    return flex_launch.launch_body(launch.settings, deployment.template_path(), launch.pipeline_args)


def _bucket(location: str) -> str:
    return "/".join(location.split("/")[:3])


def iam_commands(deployment: Deployment, scheduler_account: str) -> list[list[str]]:
    """Roles the scheduler's account needs to launch the template as the worker account, and the staging grant."""
    member = f"--member=serviceAccount:{scheduler_account}"
    worker_account = deployment.service_account_email or "PROJECT_NUMBER-compute@developer.gserviceaccount.com"
    return [
        # Create Dataflow jobs (flexTemplates:launch).
        ["gcloud", "projects", "add-iam-policy-binding", deployment.project, member, "--role=roles/dataflow.developer"],
        # Start them as the worker service account.
        ["gcloud", "iam", "service-accounts", "add-iam-policy-binding", worker_account, member,
         "--role=roles/iam.serviceAccountUser", f"--project={deployment.project}"],
        # Read the template spec file.
        ["gcloud", "storage", "buckets", "add-iam-policy-binding", _bucket(deployment.template_path()), member,
         "--role=roles/storage.objectViewer"],
        # The launcher VM runs as the worker account and writes the job object and its logs under the staging
        # location (template_launches/JOB_ID/); the workers read the staged pipeline from there.
        ["gcloud", "storage", "buckets", "add-iam-policy-binding", _bucket(deployment.staging_root()),
         f"--member=serviceAccount:{worker_account}", "--role=roles/storage.objectAdmin"],
    ]


def scheduler_command(
    profile: LaunchProfile, deployment: Deployment, body_file: str, scheduler_account: str, schedule: str, time_zone: str
) -> list[str]:
    return [
        "gcloud", "scheduler", "jobs", "create", "http", scheduler_job_name(profile),
        f"--project={deployment.project}",
        f"--location={deployment.region}",
        f"--schedule={schedule}",
        f"--time-zone={time_zone}",
        f"--uri={flex_launch.launch_url(deployment.project, deployment.region)}",
        "--http-method=POST",
        "--headers=Content-Type=application/json",
        f"--message-body-from-file={body_file}",
        f"--oauth-service-account-email={scheduler_account}",
        f"--oauth-token-scope={CLOUD_PLATFORM_SCOPE}",
        # A retried POST after a launch that did succeed meets the running job's name and fails harmlessly.
        "--max-retry-attempts=2",
    ]


# Cloud Monitoring alerting policies (REST JSON, projects.alertPolicies: AlertPolicy), one pair per nightly job.
# 1. The night's Dataflow job failed, in the launcher or on the workers (a refused rerun of a finished night, an
#    error budget exceeded, storage down past its budget): Dataflow's job/is_failed metric on the dataflow_job
#    resource ("Has this job failed"; Cloud Monitoring "Google Cloud metrics", dataflow), for this night's fixed job
#    name, aligned with ALIGN_MAX: a numeric gauge, 1 once the job failed. (The metric table's value-type row was not
#    readable here; public alerting policies on this metric align it with ALIGN_MAX or ALIGN_SUM, which Monitoring
#    accepts only for numeric values, so not BOOL; a wrong aligner is refused when the policy is created, not later.)
# 2. The launch itself was refused, so no job exists to fail: Cloud Scheduler logs the start and the end of every
#    execution on the cloud_scheduler_job resource (Cloud Scheduler docs, "Troubleshoot Cloud Scheduler", "View
#    logs"), a failed one (403, 409 while the last night still runs, ...) at severity ERROR (that severity is not
#    confirmed by the docs text available here: check it once with `gcloud scheduler jobs run` before trusting the
#    alert, docs/operations.md step 12). A log-based alerting policy (Cloud Monitoring, "Configure log-based
#    alerting policies": conditionMatchedLog; AlertStrategy.notificationRateLimit is "required for alert policies
#    with a LogMatch condition", Monitoring API v3 reference) matches them.
# A night run from Composer instead fails its task (launch/composer/vision_batch_launch.py) and still trips policy 1.
ALERT_RATE_LIMIT = "3600s"  # at most one notification an hour per policy
ALERT_AUTO_CLOSE = "604800s"  # an incident nobody closed closes after 7 days


def alert_policies(profile: LaunchProfile, deployment: Deployment) -> dict[str, dict[str, Any]]:
    """File name -> AlertPolicy body: the nightly job failed; the nightly launch was refused."""
    job, runbook = scheduler_job_name(profile), "docs/operations.md, \"Troubleshooting\" and \"When a night fails\""
    return {
        f"alert-job-failed-{profile.name}.json": {
            "displayName": f"{job}: Dataflow job failed",
            "combiner": "OR",
            "conditions": [{
                "displayName": f"Dataflow job {job} failed",
                "conditionThreshold": {
                    "filter": f'resource.type="dataflow_job" AND metric.type="dataflow.googleapis.com/job/is_failed" '
                              f'AND resource.labels.job_name="{job}"',
                    "comparison": "COMPARISON_GT",
                    "thresholdValue": 0,
                    "duration": "0s",
                    "aggregations": [{"alignmentPeriod": "300s", "perSeriesAligner": "ALIGN_MAX"}],
                },
            }],
            "alertStrategy": {"autoClose": ALERT_AUTO_CLOSE},
            "documentation": {"mimeType": "text/markdown", "content": (
                f"The nightly job {job} failed in project {deployment.project}, region {deployment.region}. Read the "
                f"job's error in the Dataflow console (or the launcher's log under {deployment.staging_root()}/"
                f"template_launches/JOB_ID/console_logs), fix it and rerun the night: {runbook}."
            )},
        },
        f"alert-launch-refused-{profile.name}.json": {
            "displayName": f"{job}: nightly launch refused",
            "combiner": "OR",
            "conditions": [{
                "displayName": f"Cloud Scheduler could not launch {job}",
                "conditionMatchedLog": {
                    "filter": f'resource.type="cloud_scheduler_job" AND resource.labels.job_id="{job}" '
                              f'AND resource.labels.location="{deployment.region}" AND severity>=ERROR',
                },
            }],
            "alertStrategy": {"notificationRateLimit": {"period": ALERT_RATE_LIMIT}, "autoClose": ALERT_AUTO_CLOSE},
            "documentation": {"mimeType": "text/markdown", "content": (
                f"Cloud Scheduler's launch of {job} failed: no Dataflow job ran tonight. The log entry holds the "
                f"HTTP status (403: the scheduler's account lacks a grant; 409: the previous night still runs): {runbook}."
            )},
        },
    }


def alert_commands(deployment: Deployment, policy_files: Sequence[str]) -> list[list[str]]:
    """A notification channel (e-mail), then one policy per file, notifying it."""
    project = f"--project={deployment.project}"
    # Cloud SDK reference: `gcloud beta monitoring channels create` (--display-name, --type, --channel-labels);
    # `gcloud monitoring policies create` (GA; --policy-from-file takes an AlertPolicy as JSON or YAML,
    # --notification-channels the channels' resource names).
    commands = [[
        "gcloud", "beta", "monitoring", "channels", "create", "--display-name=vision-batch nightly", "--type=email",
        "--channel-labels=email_address=YOU@example.com", project,
    ]]
    for policy_file in policy_files:
        commands.append([
            "gcloud", "monitoring", "policies", "create", f"--policy-from-file={policy_file}",
            "--notification-channels=CHANNEL_ID", project,
        ])
    return commands


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.schedule", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--profile", required=True, choices=sorted(PROFILES))
    parser.add_argument("--input", required=True, help="glob of the inputs to watch (gs://)")
    parser.add_argument("--output_root", required=True, help="gs:// root; each night writes OUTPUT_ROOT/YYYY-MM-DD")
    parser.add_argument("--model", required=True, help="Gemma 4 checkpoint in GCS")
    parser.add_argument("--scheduler_service_account", required=True, help="service account Cloud Scheduler calls Dataflow as")
    parser.add_argument("--schedule", default=DEFAULT_SCHEDULE, help="cron schedule (default: 02:00 daily)")
    parser.add_argument("--time_zone", default="Etc/UTC", help="time zone of --schedule")
    parser.add_argument("--write", type=pathlib.Path, default=None, metavar="DIR", help="write the launch body JSON here")
    add_deployment_args(parser)
    args, extra = parser.parse_known_args(argv)
    profile = get_profile(args.profile)
    deployment = deployment_from_args(args)
    body = nightly_body(profile, deployment, args.input, args.output_root, args.model, extra)
    text = json.dumps(body, indent=2) + "\n"
    body_file = f"nightly-{profile.name}.json"
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        (args.write / body_file).write_text(text)
        body_file = str(args.write / body_file)
    else:
        print(f"# {body_file}: save this body (or rerun with --write DIR)")
        print(text)
    print("# roles for the scheduler's service account, and the workers' access to the staging location")
    for command in iam_commands(deployment, args.scheduler_service_account):
        print(command_text(command))
    print("# the nightly job")
    print(command_text(scheduler_command(
        profile, deployment, body_file, args.scheduler_service_account, args.schedule, args.time_zone
    )))
    policies = alert_policies(profile, deployment)
    policy_files = list(policies)
    if args.write:
        for name, policy in policies.items():
            (args.write / name).write_text(json.dumps(policy, indent=2) + "\n")
        policy_files = [str(args.write / name) for name in policies]
    print("# alerts: a failed night, a refused launch (the channel command prints its id: put it in CHANNEL_ID"
          + ("" if args.write else "; rerun with --write DIR for the policy files") + ")")
    for command in alert_commands(deployment, policy_files):
        print(command_text(command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
