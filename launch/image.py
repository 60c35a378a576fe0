"""Container images: names, tags and build arguments, all derived from setup.py.

setup.py is the one place that pins the Beam version (launcher and workers
must run the same one), the vLLM versions, and the package version. The
worker image's base (`vllm/vllm-tpu:v<vllm-tpu>` for TPU workers,
`vllm/vllm-openai:v<vllm>` for GPU workers), the Beam SDK image its boot
files come from (`apache/beam_python3.12_sdk:<beam>`) and the image tags
are computed from it here, so a version bump in setup.py moves them all.
Standard library only (tests/test_launch_image.py imports it without
site-packages): launch/build_image.sh runs it with any python3.

    python3 -m launch.image --profile tpu-v6e-1 --registry REGION-docker.pkg.dev/PROJECT/REPO substitutions
    python3 -m launch.image --profile gpu-l4 --registry ... build-args
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import pathlib
import re
import sys
from typing import Any, Mapping, Optional, Sequence

from launch.accelerators import CUDA, TPU, WorkerShape
from launch.workers import profile_worker

SETUP_PY = pathlib.Path(__file__).resolve().parent.parent / "setup.py"
# Python of the vllm/vllm-tpu and vllm/vllm-openai images: the Beam SDK image must match it (local development
# uses 3.11; submit from 3.12, or through the flex template, whose launcher image is 3.12 too).
WORKER_PYTHON = "3.12"
WORKER_IMAGE_NAMES = {TPU: "vision-batch-tpu", CUDA: "vision-batch-gpu"}
LAUNCHER_IMAGE_NAME = "vision-batch-launcher"


@dataclasses.dataclass(frozen=True)
class PackagePins:
    version: str  # the package version: image tags
    beam: str  # apache-beam version pinned in install_requires
    vllm_tpu: str  # vllm-tpu version pinned in the `tpu` extra
    vllm_cuda: str  # vllm version pinned in the `gpu` extra

    def vllm_for(self, platform: str) -> str:
        return self.vllm_tpu if platform == TPU else self.vllm_cuda


def _literal(node: ast.AST, names: Mapping[str, Any]) -> Any:
    """Value of a literal expression, resolving module-level names; None for anything else."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(element, names) for element in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k, names): _literal(v, names) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.Constant):
        return node.value
    return None


def _pinned(requirements: Sequence[Any], distribution: str) -> str:
    pattern = re.compile(rf"^{re.escape(distribution)}(\[[^\]]*\])?==([0-9][^,;\s]*)$")
    for requirement in requirements:
        match = pattern.match(str(requirement).strip())
        if match:
            return match.group(2)
    raise ValueError(f"setup.py pins no exact {distribution}==VERSION (the images are derived from it)")


def package_pins(setup_py: pathlib.Path = SETUP_PY) -> PackagePins:
    """Versions read from setup.py's source (setup.py itself is a script and is not run)."""
    module = ast.parse(setup_py.read_text())
    names = {
        target.id: _literal(statement.value, {})
        for statement in module.body
        if isinstance(statement, ast.Assign)
        for target in statement.targets
        if isinstance(target, ast.Name)
    }
    calls = [
        node for node in ast.walk(module)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setup"
    ]
    if len(calls) != 1:
        raise ValueError(f"{setup_py}: expected one setup(...) call, found {len(calls)}")
    keywords = {kw.arg: _literal(kw.value, names) for kw in calls[0].keywords if kw.arg}
    extras = keywords.get("extras_require") or {}
    return PackagePins(
        version=str(keywords["version"]),
        beam=_pinned(keywords.get("install_requires") or [], "apache-beam"),
        vllm_tpu=_pinned(extras.get("tpu") or [], "vllm-tpu"),
        vllm_cuda=_pinned(extras.get("gpu") or [], "vllm"),
    )


def registry(project: str, region: str, repository: str) -> str:
    """Artifact Registry Docker repository in the job's region (workers pull from it)."""
    return f"{region}-docker.pkg.dev/{project}/{repository}"


def worker_tag(pins: PackagePins, worker: WorkerShape) -> str:
    """One TPU image per slice (its topology variables are baked in); one GPU image for every GPU shape."""
    return f"{pins.version}-{worker.name}" if worker.chip.platform == TPU else pins.version


def worker_image(registry_path: str, pins: PackagePins, worker: WorkerShape) -> str:
    return f"{registry_path}/{WORKER_IMAGE_NAMES[worker.chip.platform]}:{worker_tag(pins, worker)}"


def launcher_image(registry_path: str, pins: PackagePins) -> str:
    return f"{registry_path}/{LAUNCHER_IMAGE_NAME}:{pins.version}"


def vllm_image(pins: PackagePins, platform: str) -> str:
    """vLLM's own image of the pinned version: vllm-tpu for TPU workers, the CUDA server image for GPU workers."""
    return f"vllm/vllm-tpu:v{pins.vllm_tpu}" if platform == TPU else f"vllm/vllm-openai:v{pins.vllm_cuda}"


def worker_target(worker: WorkerShape) -> str:
    """The final stage of launch/Dockerfile for this worker: `tpu` or `cuda`."""
    return worker.chip.platform


def worker_build_args(pins: PackagePins, worker: WorkerShape) -> dict[str, str]:
    """`ARG`s of launch/Dockerfile for this worker's target stage."""
    return {
        "VLLM_IMAGE": vllm_image(pins, worker.chip.platform),
        "BEAM_SDK_IMAGE": f"apache/beam_python{WORKER_PYTHON}_sdk:{pins.beam}",
        "BEAM_VERSION": pins.beam,
        "VLLM_VERSION": pins.vllm_for(worker.chip.platform),
        "PYTHON_VERSION": WORKER_PYTHON,
        **worker.image_env(),
    }


def launcher_build_args(pins: PackagePins) -> dict[str, str]:
    """`ARG`s of launch/flex_template/Dockerfile: the same Python and Beam as the workers."""
    return {
        # Dataflow's Python launcher base for that Python; it only contributes the launcher binary.
        "LAUNCHER_BASE_IMAGE": f"gcr.io/dataflow-templates-base/python{WORKER_PYTHON.replace('.', '')}"
                               "-template-launcher-base:latest",
        "BEAM_VERSION": pins.beam,
        "PYTHON_VERSION": WORKER_PYTHON,
    }


def substitutions(registry_path: str, pins: PackagePins, worker: WorkerShape) -> dict[str, str]:
    """Cloud Build substitutions of launch/cloudbuild.yaml (both images' build arguments)."""
    build_args = {**worker_build_args(pins, worker), **launcher_build_args(pins)}
    values = {f"_{name}": value for name, value in build_args.items()}
    values["_WORKER_TARGET"] = worker_target(worker)
    values["_WORKER_IMAGE"] = worker_image(registry_path, pins, worker)
    values["_LAUNCHER_IMAGE"] = launcher_image(registry_path, pins)
    return values


def gcloud_substitutions(values: Mapping[str, str]) -> str:
    """One --substitutions value. Values hold commas (2,2,1), so `^@^` switches gcloud's delimiter to @."""
    if any("@" in f"{k}{v}" for k, v in values.items()):
        raise ValueError("a substitution contains '@', the delimiter chosen for gcloud")
    return "^@^" + "@".join(f"{k}={v}" for k, v in values.items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m launch.image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="launch profile (launch/profiles.py)")
    parser.add_argument("--registry", required=True, help="REGION-docker.pkg.dev/PROJECT/REPOSITORY")
    parser.add_argument(
        "what", choices=["substitutions", "build-args", "launcher-build-args", "worker-image", "launcher-image"]
    )
    args = parser.parse_args(argv)
    pins = package_pins()
    worker = profile_worker(args.profile)
    outputs = {
        "substitutions": lambda: gcloud_substitutions(substitutions(args.registry, pins, worker)),
        "build-args": lambda: "\n".join([f"--target={worker_target(worker)}", _as_build_args(worker_build_args(pins, worker))]),
        "launcher-build-args": lambda: _as_build_args(launcher_build_args(pins)),
        "worker-image": lambda: worker_image(args.registry, pins, worker),
        "launcher-image": lambda: launcher_image(args.registry, pins),
    }
    print(outputs[args.what]())
    return 0


def _as_build_args(values: Mapping[str, str]) -> str:
    """One `--build-arg=K=V` per line (build_image.sh reads them into an array, one docker argument each)."""
    return "\n".join(f"--build-arg={k}={v}" for k, v in values.items())


if __name__ == "__main__":
    sys.exit(main())
