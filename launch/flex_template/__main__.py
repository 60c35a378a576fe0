"""Flex template: regenerate metadata.json, check it, or print the build commands.

    python -m launch.flex_template --write
    python -m launch.flex_template --check
    python -m launch.flex_template --commands --profile tpu-v6e-4 --project P --region R --temp_location gs://B/tmp

The run command for given inputs comes from `python -m launch.submit ... --template --dry-run`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from launch.deployment import add_deployment_args, deployment_from_args
from launch.flex_template import METADATA_PATH, render
from launch.image import package_pins
from launch.profiles import PROFILES, get_profile
from launch.shell import command_text


def build_commands(argv: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m launch.flex_template --commands", allow_abbrev=False)
    parser.add_argument("--profile", required=True, choices=sorted(PROFILES))
    add_deployment_args(parser)
    args = parser.parse_args(argv)
    deployment = deployment_from_args(args)
    images = ["launch/build_image.sh", "--profile", args.profile, "--project", deployment.project,
              "--region", deployment.region, "--repository", deployment.repository]
    template = [
        "gcloud", "dataflow", "flex-template", "build", deployment.template_path(),
        f"--project={deployment.project}",
        f"--image={deployment.launcher_image()}",
        "--sdk-language=PYTHON",
        f"--metadata-file={METADATA_PATH.relative_to(METADATA_PATH.parents[2])}",
    ]
    profile = get_profile(args.profile)
    return "\n".join([
        f"# 1. worker image {deployment.worker_image(profile)} and launcher image {deployment.launcher_image()}",
        command_text(images),
        f"# 2. the template spec (points at the launcher image; version {package_pins().version})",
        command_text(template),
        "# 3. a launch: python -m launch.submit --profile ... --template --dry-run prints its gcloud command",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.flex_template", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"regenerate {METADATA_PATH.name}")
    action.add_argument("--check", action="store_true", help=f"exit 1 if {METADATA_PATH.name} is out of date")
    action.add_argument("--commands", action="store_true", help="print the image and template build commands")
    args, rest = parser.parse_known_args(argv)
    if args.commands:
        print(build_commands(rest))
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    current = METADATA_PATH.read_text() if METADATA_PATH.exists() else ""
    if args.write:
        METADATA_PATH.write_text(render())
        print(f"wrote {METADATA_PATH}")
        return 0
    if current != render():
        print(f"{METADATA_PATH} is out of date: run python -m launch.flex_template --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
