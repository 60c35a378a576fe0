"""A launch profile + deployment + the user's pipeline options -> the full Dataflow job settings.

Two renderings of the same settings: Beam command-line options (direct
submission, `--dry-run`) and a `flexTemplates:launch` request body
(flex template runs, the nightly schedule). Both come from `JobSettings`,
so a scheduled run and a manual one cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import re
from typing import Any, Optional, Sequence

from configuration.options import EnginePlan, parse_command_line, plan_engine, validate
from engine import profiles as engine_profiles
from launch.accelerators import TPU
from launch.deployment import Deployment
from launch.profiles import LaunchProfile, check_engine_fits
from schemas.uris import without_credentials

# One SDK process per worker VM: only one process may open the TPU (/dev/vfio/0 busy; Dataflow docs, "Run a
# pipeline with TPUs"), a GPU holds one engine's weights, not one per vCPU (Dataflow "Support for GPUs", GPUs
# and worker parallelism), and one engine per process serves all harness threads. Used where the engine
# profile's host_feeders is 1.
SINGLE_PROCESS_EXPERIMENT = "no_use_multiple_sdk_containers"
# With --host_feeders N above 1 (every profile has 1: unverified on Dataflow), the worker VM runs several SDK
# processes feeding one engine core (engine/host.py). Dataflow has no option for how many: without the experiment
# above, Runner v2 "launches one Apache Beam SDK process per VM core" (Dataflow docs, "Dataflow support for GPUs",
# GPUs and worker parallelism), and --sdk_worker_parallelism is read only by the Flink/Spark job servers, not by
# Dataflow (apache/beam#21839). N is never derived from the vCPU count: the user's N is passed on as given, the
# core gets N + spare client slots, and processes beyond them fail their engine start naming the slots' owners
# (engine.host.HostEngineFull). Each process admits a share of the in-flight limit sized from the clients
# attached, and runs few harness threads. Whether a TPU VM's SDK processes share one container (temp dir, PIDs)
# is undocumented (the GPU page: "each SDK process runs in its own Docker container"); processes that do not
# stop at engine start (engine.host.HostEngineNotShared) naming --host_feeders=1 as the fix.
FEEDER_HARNESS_THREADS = 4
# Beam's --autoscaling_algorithm values and their Dataflow API names (flex template environment).
AUTOSCALING_API_NAMES = {"THROUGHPUT_BASED": "AUTOSCALING_ALGORITHM_BASIC", "NONE": "AUTOSCALING_ALGORITHM_NONE"}


@dataclasses.dataclass(frozen=True)
class Workers:
    """How many accelerator workers, and whether Dataflow may change the count."""

    initial: int
    maximum: int
    autoscaling: str  # a key of AUTOSCALING_API_NAMES

    @staticmethod
    def batch(maximum: int) -> "Workers":
        # Start with one worker and let Dataflow add more while there is backlog: incremental
        # nightly runs often have little new work, and every accelerator worker costs ~10+ minutes to start.
        return Workers(initial=1, maximum=maximum, autoscaling="THROUGHPUT_BASED")


@dataclasses.dataclass(frozen=True)
class JobSettings:
    """Everything Dataflow needs besides the pipeline's own options."""

    job_name: str
    project: str
    region: str
    temp_location: str
    staging_location: str  # Beam's staged pipeline, and the flex launcher's job object and logs
    zone: Optional[str]
    service_account: Optional[str]
    machine_type: str
    service_options: tuple[str, ...]  # --dataflow_service_options (worker_accelerator=...)
    experiments: tuple[str, ...]
    harness_threads: int
    disk_size_gb: int
    workers: Workers
    sdk_container_image: str

    def beam_args(self) -> list[str]:
        """Beam/Dataflow command-line options, in the form PipelineOptions parses."""
        args = [
            "--runner=DataflowRunner",
            f"--project={self.project}",
            f"--region={self.region}",
            f"--temp_location={self.temp_location}",
            f"--staging_location={self.staging_location}",
            f"--job_name={self.job_name}",
            f"--worker_machine_type={self.machine_type}",
            *(f"--dataflow_service_options={option}" for option in self.service_options),
            *(f"--experiments={experiment}" for experiment in self.experiments),
            f"--number_of_worker_harness_threads={self.harness_threads}",
            f"--disk_size_gb={self.disk_size_gb}",
            f"--num_workers={self.workers.initial}",
            f"--max_num_workers={self.workers.maximum}",
            f"--autoscaling_algorithm={self.workers.autoscaling}",
            f"--sdk_container_image={self.sdk_container_image}",
            # The worker image already holds this package and its dependencies: stage nothing.
            "--sdk_location=container",
        ]
        if self.zone:
            args.append(f"--worker_zone={self.zone}")
        if self.service_account:
            args.append(f"--service_account_email={self.service_account}")
        return args

    def flex_environment(self) -> dict[str, Any]:
        """`FlexTemplateRuntimeEnvironment` (REST JSON). Service options travel as experiments there."""
        environment: dict[str, Any] = {
            "tempLocation": self.temp_location,
            # Without it the launcher stages into Dataflow's default bucket (dataflow-staging-REGION-NUMBER),
            # which the worker service account that runs the launcher may not be able to write.
            "stagingLocation": self.staging_location,
            "machineType": self.machine_type,
            "additionalExperiments": [*self.service_options, *self.experiments],
            "diskSizeGb": self.disk_size_gb,
            "numWorkers": self.workers.initial,
            "maxWorkers": self.workers.maximum,
            "autoscalingAlgorithm": AUTOSCALING_API_NAMES[self.workers.autoscaling],
            "sdkContainerImage": self.sdk_container_image,
            "additionalPipelineOptions": [
                f"number_of_worker_harness_threads={self.harness_threads}",
                "sdk_location=container",
            ],
        }
        if self.zone:
            environment["workerZone"] = self.zone
        if self.service_account:
            environment["serviceAccountEmail"] = self.service_account
        return environment


def job_settings(
    profile: LaunchProfile, deployment: Deployment, workers: Workers, job_name: str, host_feeders: int = 1
) -> JobSettings:
    """`host_feeders` > 1: one SDK process per vCPU, all feeding one engine core (see FEEDER_HARNESS_THREADS)."""
    return JobSettings(
        job_name=job_name,
        project=deployment.project,
        region=deployment.region,
        temp_location=deployment.temp_location,
        staging_location=deployment.staging_root(),
        zone=deployment.zone,
        service_account=deployment.service_account_email,
        machine_type=profile.worker.machine_type,
        service_options=(profile.worker.service_option(),),
        experiments=(SINGLE_PROCESS_EXPERIMENT,) if host_feeders == 1 else (),
        harness_threads=profile.harness_threads if host_feeders == 1 else min(profile.harness_threads, FEEDER_HARNESS_THREADS),
        disk_size_gb=profile.disk_size_gb,
        workers=workers,
        sdk_container_image=deployment.worker_image(profile),
    )


def timestamped_job_name(profile: LaunchProfile, now: datetime.datetime, purpose: str) -> str:
    """Dataflow job names: lower-case letters, digits and hyphens, starting with a letter."""
    return f"vision-batch-{purpose}-{profile.name}-{now:%Y%m%d-%H%M%S}"


def effective_engine(profile: LaunchProfile, pipeline_args: Sequence[str]) -> EnginePlan:
    """The engine the workers will run, planned as they will plan it (`plan_engine`), checked for the worker.

    The job's options are refused here as the pipeline's command line
    refuses them (a misspelt `--max_token ocr=512` would otherwise launch and
    run with the default budget), and --task_file is read once for the plan.
    """
    request = validate(parse_command_line(pipeline_args))
    if request.opts.engine_profile != profile.engine_profile:
        raise ValueError(
            f"--engine_profile {request.opts.engine_profile} does not belong to launch profile {profile.name} "
            f"(which runs {profile.engine_profile}); choose the worker shape with --profile"
        )
    # Without the checkpoint (a gs:// location the launcher does not read): the accelerator profiles are not sized from it.
    engine = plan_engine(request, feeders=functools.partial(_worker_feeders, profile))
    # Tasks may ask for their own image budget (--task_vision_tokens, a task file): the worker must fit the largest.
    check_engine_fits(profile.worker, dataclasses.replace(engine.profile, vision_tokens=engine.largest_vision_tokens))
    return engine


def _worker_feeders(profile: LaunchProfile, wanted: int) -> int:
    """`wanted` as given (never the vCPU count: see FEEDER_HARNESS_THREADS), refused above the worker's SDK processes."""
    vcpus = profile.worker.vcpus  # `wanted` is at least 1: check_values and the profiles see to it
    if wanted > vcpus:
        raise ValueError(f"--host_feeders {wanted}: a {profile.worker.machine_type} worker runs at most {vcpus} SDK processes")
    return wanted


def xla_cache_path(deployment: Deployment, profile: LaunchProfile, engine: engine_profiles.EngineProfile) -> str:
    """`<root>/<image tag>/<engine profile>-<hash of engine arguments>`.

    XLA programs depend on the software in the image and on every shape
    the engine arguments fix (batch tokens, sequences, lengths, block size,
    TP, dtypes, image budget). A new directory per combination keeps caches
    from piling up in one place and makes a stale one easy to delete; JAX
    also keys each entry by its program, so a shared directory is never wrong.
    """
    image_ref = deployment.worker_image(profile)
    version = image_ref.rsplit("@", 1)[1] if "@" in image_ref else image_ref.rsplit(":", 1)[-1]
    fingerprint = json.dumps(
        {"engine_args": engine.engine_args, "vision_tokens": engine.vision_tokens}, sort_keys=True, default=str
    )
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    return f"{deployment.xla_cache_root()}/{re.sub(r'[^A-Za-z0-9._-]', '_', version)}/{engine.name}-{digest}"


def profile_pipeline_args(
    profile: LaunchProfile, deployment: Deployment, user_args: Sequence[str]
) -> tuple[list[str], EnginePlan]:
    """The user's pipeline options plus what the launch profile decides (engine profile, feeders, TPU cache),
    and the engine the workers will run. Image budgets are the workers' own plan of the same options
    (page tasks at the profile's page budget unless the job sets --vision_tokens)."""
    base = [f"--engine_profile={profile.engine_profile}", *user_args]
    engine = effective_engine(profile, base)
    decided = [f"--host_feeders={engine.profile.host_feeders}"]
    if profile.platform == TPU:
        # XLA programs compiled at engine start (~30 min for 26B/31B): reused from GCS (VLLM_XLA_CACHE_PATH).
        decided.append(f"--xla_cache_path={xla_cache_path(deployment, profile, engine.profile)}")
    return [*base, *decided], engine


@dataclasses.dataclass(frozen=True)
class Launch:
    """One job, ready to render as Beam options or as a flex template launch."""

    settings: JobSettings
    pipeline_args: tuple[str, ...]  # VisionBatchOptions (and any other pipeline options the user passed)

    def dataflow_args(self) -> list[str]:
        return [*self.settings.beam_args(), *self.pipeline_args]


def plan_launch(
    profile: LaunchProfile, deployment: Deployment, workers: Workers, job_name: str, user_args: Sequence[str]
) -> Launch:
    # The job's options travel to Dataflow (the console shows them, the launch request and the dry run print
    # them): URIs without credentials, as the job would read them anyway (schemas.uris.canonical_uri).
    user_args = [without_credentials(arg) for arg in user_args]
    pipeline_args, engine = profile_pipeline_args(profile, deployment, user_args)
    settings = job_settings(profile, deployment, workers, job_name, engine.profile.host_feeders)
    return Launch(settings, tuple(pipeline_args))
