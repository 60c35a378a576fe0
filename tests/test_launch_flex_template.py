"""Flex template metadata and flexTemplates:launch bodies, checked against the pipeline and the Dataflow API types."""
from __future__ import annotations

import json
import re

import pytest
from google.cloud import dataflow_v1beta3

from launch import flex_launch, flex_template, schedule
from launch.job import Workers, plan_launch
from launch.profiles import PROFILES
from tests.launch_support import DEPLOYMENT, USER_ARGS, go_offline

COMMITTED = json.loads(flex_template.METADATA_PATH.read_text())


def test_committed_metadata_is_what_the_generator_writes():
    assert flex_template.METADATA_PATH.read_text() == flex_template.render(), (
        "launch/flex_template/metadata.json is out of date: run python -m launch.flex_template --write"
    )


def test_every_pipeline_option_is_a_parameter_and_none_is_invented():
    options = [action.dest for action in flex_template.pipeline_options()]
    assert [p["name"] for p in COMMITTED["parameters"]] == options


def test_metadata_has_the_dataflow_template_metadata_shape():
    metadata = dataflow_v1beta3.TemplateMetadata.from_json(json.dumps(COMMITTED))  # unknown fields raise
    assert all(p.label and p.help_text for p in metadata.parameters)
    required = {p.name for p in metadata.parameters if not p.is_optional}
    assert required == {"output", "model"}
    for parameter in metadata.parameters:
        for regex in parameter.regexes:
            re.compile(regex)


def test_the_ui_table_cannot_describe_an_option_the_pipeline_lacks(monkeypatch):
    monkeypatch.setitem(flex_template.PARAMETER_UI, "no_such_option", flex_template.ParameterUI("x"))
    with pytest.raises(ValueError, match="no_such_option"):
        flex_template.metadata()


def _accepted_by_template(parameters):
    """Dataflow rejects undeclared parameters and values that miss a declared regex."""
    declared = {p["name"]: p for p in COMMITTED["parameters"]}
    for name, value in parameters.items():
        assert name in declared, f"{name} is not a template parameter"
        for regex in declared[name].get("regexes", []):
            assert re.match(regex, value), f"{name}={value!r} fails {regex}"


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_launch_bodies_fit_the_api_and_the_template(name):
    profile = PROFILES[name]
    launch = plan_launch(profile, DEPLOYMENT, Workers.batch(2), "vision-batch-x", [*USER_ARGS, "--tasks=ocr,detect"])
    body = flex_launch.launch_body(launch.settings, DEPLOYMENT.template_path(), launch.pipeline_args)
    request = flex_launch.validated(body)
    assert isinstance(request, dataflow_v1beta3.LaunchFlexTemplateRequest)
    environment = request.launch_parameter.environment
    assert environment.machine_type == profile.slice.machine_type
    assert profile.slice.service_option() in environment.additional_experiments
    assert "no_use_multiple_sdk_containers" in environment.additional_experiments
    assert environment.autoscaling_algorithm == dataflow_v1beta3.AutoscalingAlgorithm.AUTOSCALING_ALGORITHM_BASIC
    assert environment.sdk_container_image.endswith(f"vision-batch-tpu:0.1.0-{profile.slice.name}")
    _accepted_by_template(body["launchParameter"]["parameters"])


def test_a_template_parameter_takes_one_value():
    with pytest.raises(ValueError, match="given twice"):
        flex_launch.args_to_parameters(["--input=gs://a/*", "--input", "gs://b/*"])
    assert flex_launch.args_to_parameters(["--tasks", "ocr", "--model=gs://m"]) == {"tasks": "ocr", "model": "gs://m"}


def test_gcloud_run_command_carries_every_environment_field():
    launch = plan_launch(PROFILES["tpu-v6e-4"], DEPLOYMENT, Workers.batch(3), "vision-batch-x", USER_ARGS)
    body = flex_launch.launch_body(launch.settings, "gs://my-bucket/t.json", launch.pipeline_args)
    command = flex_launch.gcloud_run_command("my-project", "us-east5", body)
    text = " ".join(command)
    assert command[:5] == ["gcloud", "dataflow", "flex-template", "run", "vision-batch-x"]
    for fragment in ("--worker-machine-type=ct6e-standard-4t", "--max-workers=3", "--worker-zone=us-east5-b",
                     "topology:2x2,no_use_multiple_sdk_containers", "disk_size_gb=200",
                     "autoscaling_algorithm=THROUGHPUT_BASED", "number_of_worker_harness_threads=32"):
        assert fragment in text


def test_nightly_body_is_date_stamped_incremental_and_valid(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path)
    profile = PROFILES["tpu-v6e-4"]
    body = schedule.nightly_body(
        profile, DEPLOYMENT, "gs://my-bucket/incoming/**", "gs://my-bucket/nightly/", "gs://my-bucket/models/g", []
    )
    flex_launch.validated(body)
    launch = body["launchParameter"]
    assert launch["jobName"] == "vision-batch-nightly-tpu-v6e-4"  # fixed: a still-running night blocks the next
    assert launch["parameters"]["output"] == "gs://my-bucket/nightly/{date}"
    assert launch["parameters"]["incremental_from"] == "gs://my-bucket/nightly/*"
    _accepted_by_template(launch["parameters"])


def test_scheduler_command_posts_the_body_to_flex_templates_launch():
    command = schedule.scheduler_command(
        PROFILES["tpu-v6e-4"], DEPLOYMENT, "nightly.json", "sa@my-project.iam.gserviceaccount.com", "0 2 * * *", "Etc/UTC"
    )
    assert "--uri=https://dataflow.googleapis.com/v1b3/projects/my-project/locations/us-east5/flexTemplates:launch" in command
    assert "--message-body-from-file=nightly.json" in command
    assert "--oauth-service-account-email=sa@my-project.iam.gserviceaccount.com" in command
