"""Flex template metadata and flexTemplates:launch bodies, checked against the pipeline and the Dataflow API types."""
from __future__ import annotations

import ast
import json
import pathlib
import re

import pytest
from google.api_core import path_template
from google.cloud import dataflow_v1beta3
from google.cloud.dataflow_v1beta3.services.flex_templates_service.transports.rest_base import (
    _BaseFlexTemplatesServiceRestTransport,
)

from engine.profiles import PROFILES as ENGINE_PROFILES
from launch import flex_launch, flex_template, schedule
from launch.composer import vision_batch_launch
from launch.job import Workers, plan_launch
from launch.profiles import PROFILES
from tests.launch_support import BUCKET, DEPLOYMENT, USER_ARGS, go_offline

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
    assert environment.machine_type == profile.worker.machine_type
    assert environment.staging_location == f"gs://{BUCKET}/vision-batch/staging"
    assert profile.worker.service_option() in environment.additional_experiments
    single = ENGINE_PROFILES[profile.engine_profile].host_feeders == 1  # else one SDK process per vCPU
    assert ("no_use_multiple_sdk_containers" in environment.additional_experiments) is single
    assert environment.autoscaling_algorithm == dataflow_v1beta3.AutoscalingAlgorithm.AUTOSCALING_ALGORITHM_BASIC
    assert environment.sdk_container_image == DEPLOYMENT.worker_image(profile)
    _accepted_by_template(body["launchParameter"]["parameters"])


def test_a_template_parameter_takes_one_value():
    with pytest.raises(ValueError, match="given twice"):
        flex_launch.args_to_parameters(["--input=gs://a/*", "--input", "gs://b/*"])
    assert flex_launch.args_to_parameters(["--tasks", "ocr", "--model=gs://m"]) == {"tasks": "ocr", "model": "gs://m"}


def test_gcloud_run_command_carries_every_environment_field():
    launch = plan_launch(PROFILES["tpu-v6e-4"], DEPLOYMENT, Workers.batch(3), "vision-batch-x", USER_ARGS)
    body = flex_launch.launch_body(launch.settings, f"gs://{BUCKET}/t.json", launch.pipeline_args)
    command = flex_launch.gcloud_run_command("my-project", "us-east5", body)
    text = " ".join(command)
    assert command[:5] == ["gcloud", "dataflow", "flex-template", "run", "vision-batch-x"]
    for fragment in ("--worker-machine-type=ct6e-standard-4t", "--max-workers=3", "--worker-zone=us-east5-b",
                     f"--staging-location=gs://{BUCKET}/vision-batch/staging",
                     "topology:2x2,no_use_multiple_sdk_containers", "disk_size_gb=200",
                     "autoscaling_algorithm=THROUGHPUT_BASED", "number_of_worker_harness_threads=32"):
        assert fragment in text


def nightly(profile_name="tpu-v6e-1", deployment=DEPLOYMENT):
    return schedule.nightly_body(
        PROFILES[profile_name], deployment, f"gs://{BUCKET}/incoming/**", f"gs://{BUCKET}/nightly/", f"gs://{BUCKET}/models/g", []
    )


def test_nightly_body_is_date_stamped_incremental_and_valid(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path)
    body = nightly()
    flex_launch.validated(body)
    launch = body["launchParameter"]
    assert launch["jobName"] == "vision-batch-nightly-tpu-v6e-1"  # fixed: a still-running night blocks the next
    assert launch["parameters"]["output"] == f"gs://{BUCKET}/nightly/{{date}}"
    assert launch["parameters"]["incremental_from"] == f"gs://{BUCKET}/nightly/*"
    _accepted_by_template(launch["parameters"])


def test_the_scheduler_posts_exactly_the_request_the_dataflow_client_would_send(monkeypatch, tmp_path):
    """Cloud Scheduler's URI and body against the client's own REST mapping of FlexTemplatesService.LaunchFlexTemplate."""
    go_offline(monkeypatch, tmp_path)
    body = nightly("gpu-l4")
    command = schedule.scheduler_command(PROFILES["gpu-l4"], DEPLOYMENT, "nightly.json",
                                         "launcher@my-project.iam.gserviceaccount.com", "0 2 * * *", "Etc/UTC")
    request = flex_launch.validated(body)
    request.project_id, request.location = "my-project", "us-east5"
    http_options = _BaseFlexTemplatesServiceRestTransport._BaseLaunchFlexTemplate._get_http_options()
    transcoded = path_template.transcode(http_options, dataflow_v1beta3.LaunchFlexTemplateRequest.pb(request))
    assert transcoded["method"] == "post" and "--http-method=POST" in command
    assert f"--uri=https://dataflow.googleapis.com{transcoded['uri']}" in command
    sent = dataflow_v1beta3.LaunchFlexTemplateRequest.from_json(json.dumps(body))
    # The transcoded body is the whole request minus the path fields: the file Cloud Scheduler posts.
    posted = dataflow_v1beta3.LaunchFlexTemplateRequest.wrap(transcoded["body"])
    assert posted.launch_parameter == sent.launch_parameter
    assert "--message-body-from-file=nightly.json" in command
    assert "--oauth-service-account-email=launcher@my-project.iam.gserviceaccount.com" in command


def test_grants_cover_launching_and_the_staging_location():
    worker = "vision-batch-worker@my-project.iam.gserviceaccount.com"
    deployment = DEPLOYMENT.__class__(**{**DEPLOYMENT.__dict__, "service_account_email": worker,
                                         "staging_location": "gs://my-project-staging/launches"})
    commands = [" ".join(c) for c in schedule.iam_commands(deployment, "launcher@my-project.iam.gserviceaccount.com")]
    assert any("roles/dataflow.developer" in c and "launcher@" in c for c in commands)
    assert any("service-accounts add-iam-policy-binding " + worker in c and "roles/iam.serviceAccountUser" in c
               for c in commands)
    assert any(f"gs://{BUCKET} " in c and "roles/storage.objectViewer" in c for c in commands)  # the template spec
    assert any("gs://my-project-staging " in c and f"serviceAccount:{worker}" in c and "roles/storage.objectAdmin" in c
               for c in commands)


def test_composer_launches_the_same_body_with_a_fixed_name_and_templated_settings(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path)
    (tmp_path / "nightly-tpu-v6e-1.json").write_text(json.dumps(nightly()))
    (tmp_path / "nightly-gpu-l4.json").write_text(json.dumps(nightly("gpu-l4")))
    (tmp_path / "unrelated.json").write_text("{}")
    files = vision_batch_launch.body_files(tmp_path)
    assert [f.name for f in files] == ["nightly-gpu-l4.json", "nightly-tpu-v6e-1.json"]
    assert [vision_batch_launch.task_id(f) for f in files] == ["launch_gpu_l4", "launch_tpu_v6e_1"]

    arguments = vision_batch_launch.launch_arguments(files[1].read_text())
    # apache-airflow-providers-google: DataflowStartFlexTemplateOperator appends a uuid unless append_job_name=False,
    # and renders body, location and project_id (its template_fields) when the task runs.
    assert arguments["append_job_name"] is False and arguments["wait_until_finished"] is False
    assert arguments["project_id"] == "{{ var.value.vision_batch_project }}"
    assert arguments["location"] == "{{ var.value.vision_batch_region }}"
    # The operator posts `body` as the flexTemplates:launch request body: after Jinja renders {{ ds }}, it must be
    # a LaunchFlexTemplateRequest, with the job name unchanged.
    rendered = json.loads(json.dumps(arguments["body"]).replace("{{ ds }}", "2026-03-04"))
    request = flex_launch.validated(rendered)
    assert request.launch_parameter.job_name == "vision-batch-nightly-tpu-v6e-1"
    assert request.launch_parameter.parameters["output"] == f"gs://{BUCKET}/nightly/2026-03-04"


def test_the_dag_file_reads_no_variable_at_parse_time_and_passes_the_arguments_through():
    """Airflow is not installed here (a large dependency tree the shared environment cannot take); the DAG's
    source is checked instead: the operator gets exactly launch_arguments(...) for every body, and nothing at
    module level reads Airflow Variables (the scheduler parses DAG files every few seconds)."""
    path = pathlib.Path(vision_batch_launch.__file__).with_name("vision_batch_nightly.py")
    tree = ast.parse(path.read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert "Variable" not in names
    [call] = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
              and getattr(node.func, "id", None) == "DataflowStartFlexTemplateOperator"]
    [splat] = [kw for kw in call.keywords if kw.arg is None]
    assert splat.value.func.id == "launch_arguments"
    dag = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DAG")
    settings = {kw.arg: ast.literal_eval(kw.value) for kw in dag.keywords if isinstance(kw.value, ast.Constant)}
    assert settings["max_active_runs"] == 1 and settings["catchup"] is False


def test_scheduler_command_posts_the_body_to_flex_templates_launch():
    command = schedule.scheduler_command(
        PROFILES["tpu-v6e-4"], DEPLOYMENT, "nightly.json", "sa@my-project.iam.gserviceaccount.com", "0 2 * * *", "Etc/UTC"
    )
    assert "--uri=https://dataflow.googleapis.com/v1b3/projects/my-project/locations/us-east5/flexTemplates:launch" in command
    assert "--message-body-from-file=nightly.json" in command
    assert "--oauth-service-account-email=sa@my-project.iam.gserviceaccount.com" in command
