"""Where a job runs: project, region, zone, buckets and image registry, from one set of flags.

`launch.submit`, `launch.flex_template` and `launch.schedule` take the same
deployment flags and derive the same image, template and cache locations
from them, so a nightly schedule launches exactly what a manual submit would.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from launch import image
from launch.profiles import LaunchProfile

DEFAULT_REPOSITORY = "vision-batch"


@dataclasses.dataclass(frozen=True)
class Deployment:
    project: str
    region: str  # Dataflow region (job control plane, Artifact Registry location)
    temp_location: str  # gs:// Dataflow temp files; its bucket also holds staging, templates and the XLA cache by default
    zone: Optional[str] = None  # worker zone: accelerator capacity and reservations are zonal
    repository: str = DEFAULT_REPOSITORY  # Artifact Registry Docker repository
    image: Optional[str] = None  # worker image override (default: derived from setup.py and the profile)
    cache_root: Optional[str] = None  # XLA compile cache root (default: <bucket>/vision-batch/xla-cache)
    service_account_email: Optional[str] = None  # worker service account (default: Compute Engine default)
    staging_location: Optional[str] = None  # gs:// staging (default: <bucket>/vision-batch/staging)

    def __post_init__(self) -> None:
        if not self.temp_location.startswith("gs://"):
            raise ValueError(f"--temp_location must be a gs:// location, got {self.temp_location!r}")
        if self.staging_location and not self.staging_location.startswith("gs://"):
            raise ValueError(f"--staging_location must be a gs:// location, got {self.staging_location!r}")
        if self.zone and not self.zone.startswith(self.region + "-"):
            raise ValueError(f"--zone {self.zone} is not in --region {self.region}")

    @property
    def bucket_root(self) -> str:
        """gs://BUCKET/vision-batch: the project's own objects, beside Dataflow's temp files."""
        bucket = self.temp_location[len("gs://"):].split("/", 1)[0]
        return f"gs://{bucket}/vision-batch"

    @property
    def registry(self) -> str:
        return image.registry(self.project, self.region, self.repository)

    def worker_image(self, profile: LaunchProfile) -> str:
        return self.image or image.worker_image(self.registry, image.package_pins(), profile.worker)

    def launcher_image(self) -> str:
        return image.launcher_image(self.registry, image.package_pins())

    def template_path(self) -> str:
        """Flex template spec in GCS, one per package version."""
        return f"{self.bucket_root}/templates/vision-batch-{image.package_pins().version}.json"

    def staging_root(self) -> str:
        """Beam's staged pipeline and the flex launcher's files (template_launches/JOB_ID/): in this bucket, which
        the worker service account (it also runs the launcher VM) can write, not Dataflow's default bucket."""
        return (self.staging_location or f"{self.bucket_root}/staging").rstrip("/")

    def xla_cache_root(self) -> str:
        # Not under temp_location: temp buckets often expire objects, and the cache must outlive runs.
        return (self.cache_root or f"{self.bucket_root}/xla-cache").rstrip("/")


def add_deployment_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("deployment")
    group.add_argument("--project", required=True, help="Google Cloud project id.")
    group.add_argument("--region", required=True, help="Dataflow region, e.g. us-east5 (must offer the accelerator).")
    group.add_argument("--zone", default=None, help="Worker zone, e.g. us-east5-b: where your accelerator quota or reservation is.")
    group.add_argument("--temp_location", required=True, help="gs:// location for Dataflow temp files.")
    group.add_argument(
        "--staging_location", default=None,
        help="gs:// staging for the pipeline and the flex launcher (default: <temp bucket>/vision-batch/staging).",
    )
    group.add_argument("--repository", default=DEFAULT_REPOSITORY, help="Artifact Registry Docker repository.")
    group.add_argument("--image", default=None, help="Worker image (default: derived from setup.py's version and the profile).")
    group.add_argument("--cache_root", default=None, help="gs:// root of the persistent XLA compile cache.")
    group.add_argument("--service_account_email", default=None, help="Worker service account.")


def deployment_from_args(args: argparse.Namespace) -> Deployment:
    """The flags of add_deployment_args carry the fields' names."""
    return Deployment(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Deployment)})
