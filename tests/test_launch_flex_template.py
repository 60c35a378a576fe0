"""Flex template metadata and flexTemplates:launch bodies, checked against the pipeline and the Dataflow API types."""
from __future__ import annotations

import ast
import datetime
import json
import pathlib
import re
import shlex

import jinja2
import pytest
from google.api_core import path_template
from google.cloud import dataflow_v1beta3
from google.cloud.dataflow_v1beta3.services.flex_templates_service.transports.rest_base import (
    _BaseFlexTemplatesServiceRestTransport,
)

from engine.profiles import PROFILES as ENGINE_PROFILES
from launch import flex_launch, flex_template, run_dataflow, schedule
from launch.composer import vision_batch_launch
from launch.job import Workers, plan_launch
from launch.profiles import PROFILES
from tests.launch_support import BUCKET, DEPLOYMENT, USER_ARGS, go_offline

COMMITTED = json.loads(flex_template.METADATA_PATH.read_text())
UTC = datetime.timezone.utc
DAG_FILE = pathlib.Path(vision_batch_launch.__file__).with_name("vision_batch_nightly.py")


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
    assert arguments["append_job_name"] is False
    assert arguments["project_id"] == "{{ var.value.vision_batch_project }}"
    assert arguments["location"] == "{{ var.value.vision_batch_region }}"
    # The operator posts `body` as the flexTemplates:launch request body: once Jinja has rendered it, it must be
    # a LaunchFlexTemplateRequest, with the job name unchanged.
    rendered = render_airflow(arguments["body"], airflow2_context(datetime.datetime(2026, 3, 4, 2, tzinfo=UTC)))
    request = flex_launch.validated(rendered)
    assert request.launch_parameter.job_name == "vision-batch-nightly-tpu-v6e-1"
    assert request.launch_parameter.parameters["output"] == f"gs://{BUCKET}/nightly/2026-03-04"


def airflow2_context(fires_at):
    """Airflow 2's cron schedule (CronDataIntervalTimetable): the run that fires at `fires_at` covers the day before
    it, and its logical date (`ds`) is that interval's start (Airflow docs, "DAG Runs", data interval)."""
    start = fires_at - datetime.timedelta(days=1)
    return {"data_interval_start": start, "data_interval_end": fires_at, "logical_date": start, "ds": f"{start:%Y-%m-%d}"}


def airflow3_context(fires_at):
    """Airflow 3's cron schedule (CronTriggerTimetable, create_cron_data_intervals=False): logical date, data interval
    start and end are all the trigger time."""
    return {"data_interval_start": fires_at, "data_interval_end": fires_at, "logical_date": fires_at, "ds": f"{fires_at:%Y-%m-%d}"}


def render_airflow(value, context):
    """Render templated operator arguments as Airflow does: Jinja with Airflow's `ds` filter (apache/airflow
    airflow/templates.py: ds_filter is strftime("%Y-%m-%d")) over every string of the value."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    environment.filters["ds"] = lambda date: date.strftime("%Y-%m-%d")
    return json.loads(environment.from_string(json.dumps(value)).render(**context))


def dag_keywords():
    tree = ast.parse(DAG_FILE.read_text())
    dag = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DAG")
    return {kw.arg: ast.literal_eval(kw.value) for kw in dag.keywords if isinstance(kw.value, ast.Constant)}


@pytest.mark.parametrize("context", [airflow2_context, airflow3_context], ids=["airflow2", "airflow3"])
def test_composer_and_cloud_scheduler_write_a_night_to_the_same_date(context, monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path)
    body = nightly()
    assert dag_keywords()["schedule"] == schedule.DEFAULT_SCHEDULE  # both fire at the same time of day (UTC)
    fires_at = datetime.datetime(2026, 3, 5, 2, 0, tzinfo=UTC)
    # Cloud Scheduler posts the body as written; the flex launcher expands {date} when it runs, minutes later.
    posted = [f"--{name}={value}" for name, value in body["launchParameter"]["parameters"].items()]
    launched = flex_launch.args_to_parameters(run_dataflow.expand_date(posted, (fires_at + datetime.timedelta(minutes=7)).date()))
    composer = render_airflow(vision_batch_launch.launch_arguments(json.dumps(body))["body"], context(fires_at))
    assert composer["launchParameter"]["parameters"]["output"] == launched["output"] == f"gs://{BUCKET}/nightly/2026-03-05"


def test_a_refused_or_failed_night_turns_the_airflow_task_red(monkeypatch, tmp_path):
    """Airflow is not installed here; the operator's arguments are checked against the provider's code path
    (apache-airflow-providers-google operators/dataflow.py): with deferrable=True, execute() launches (a refused
    launch raises there) and defers to TemplateJobStartTrigger, which reports JOB_STATE_FAILED as "error" and
    JOB_STATE_STOPPED as "stopped"; execute_complete raises AirflowException on both. With deferrable=False and
    wait_until_finished=False the task succeeds as soon as the launch request is accepted, before the launcher
    refuses anything."""
    go_offline(monkeypatch, tmp_path)
    arguments = vision_batch_launch.launch_arguments(json.dumps(nightly()))
    assert arguments["deferrable"] is True
    # _validate_deferrable_params: deferrable with wait_until_finished=True raises ValueError when the DAG is parsed;
    # left unset, the operator sets it False itself and waits in the trigger.
    assert arguments.get("wait_until_finished") is None
    # The deferred path succeeds on JOB_STATE_DONE only; an expected_terminal_state would not be read there.
    assert "expected_terminal_state" not in arguments
    # The trigger polls on through JOB_STATE_CANCELLED; the timeout ends the wait before the next night is due.
    assert datetime.timedelta(hours=1) < arguments["execution_timeout"] < datetime.timedelta(days=1)


def test_the_dag_file_reads_no_variable_at_parse_time_and_passes_the_arguments_through():
    """Airflow is not installed here (a large dependency tree the shared environment cannot take); the DAG's
    source is checked instead: the operator gets exactly launch_arguments(...) for every body, and nothing at
    module level reads Airflow Variables (the scheduler parses DAG files every few seconds)."""
    tree = ast.parse(DAG_FILE.read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert "Variable" not in names
    [call] = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
              and getattr(node.func, "id", None) == "DataflowStartFlexTemplateOperator"]
    [splat] = [kw for kw in call.keywords if kw.arg is None]
    assert splat.value.func.id == "launch_arguments"
    settings = dag_keywords()
    assert settings["max_active_runs"] == 1 and settings["catchup"] is False


def test_scheduler_command_posts_the_body_to_flex_templates_launch():
    command = schedule.scheduler_command(
        PROFILES["tpu-v6e-4"], DEPLOYMENT, "nightly.json", "sa@my-project.iam.gserviceaccount.com", "0 2 * * *", "Etc/UTC"
    )
    assert "--uri=https://dataflow.googleapis.com/v1b3/projects/my-project/locations/us-east5/flexTemplates:launch" in command
    assert "--message-body-from-file=nightly.json" in command
    assert "--oauth-service-account-email=sa@my-project.iam.gserviceaccount.com" in command


def test_schedule_writes_alert_policies_for_a_failed_night_and_a_refused_launch(monkeypatch, tmp_path, capsys):
    """Both policies parse as Cloud Monitoring's AlertPolicy (unknown fields raise) and watch this nightly job only."""
    from google.cloud import monitoring_v3

    go_offline(monkeypatch, tmp_path)
    assert schedule.main([
        "--profile", "tpu-v6e-1", "--input", f"gs://{BUCKET}/incoming/**", "--output_root", f"gs://{BUCKET}/nightly",
        "--model", f"gs://{BUCKET}/models/g", "--scheduler_service_account", "launcher@my-project.iam.gserviceaccount.com",
        "--project=my-project", "--region=us-east5", f"--temp_location=gs://{BUCKET}/tmp", "--write", str(tmp_path / "cfg"),
    ]) == 0
    out = capsys.readouterr().out
    failed, refused = (monitoring_v3.AlertPolicy.from_json((tmp_path / "cfg" / f"alert-{kind}-tpu-v6e-1.json").read_text())
                       for kind in ("job-failed", "launch-refused"))
    [condition] = failed.conditions
    assert 'metric.type="dataflow.googleapis.com/job/is_failed"' in condition.condition_threshold.filter
    assert 'resource.labels.job_name="vision-batch-nightly-tpu-v6e-1"' in condition.condition_threshold.filter
    # A numeric gauge (1 once failed): a numeric aligner, above 0. ALIGN_COUNT_TRUE is for BOOL metrics only.
    [aggregation] = condition.condition_threshold.aggregations
    assert aggregation.per_series_aligner == monitoring_v3.Aggregation.Aligner.ALIGN_MAX
    assert condition.condition_threshold.comparison == monitoring_v3.ComparisonType.COMPARISON_GT
    assert condition.condition_threshold.threshold_value == 0
    [condition] = refused.conditions
    assert 'resource.type="cloud_scheduler_job"' in condition.condition_matched_log.filter
    assert 'resource.labels.job_id="vision-batch-nightly-tpu-v6e-1"' in condition.condition_matched_log.filter
    assert refused.alert_strategy.notification_rate_limit.period.total_seconds() > 0  # log-based policies need one
    # Cloud SDK reference: `gcloud monitoring policies create --policy-from-file` is GA; channels are created with
    # `gcloud beta monitoring channels create`.
    commands = [shlex.split(command) for command in out.replace(" \\\n    ", " ").splitlines()
                if command.startswith("gcloud ") and "monitoring" in command]
    assert len(commands) == 3 and commands[0][:5] == ["gcloud", "beta", "monitoring", "channels", "create"]
    for command, kind in zip(commands[1:], ("job-failed", "launch-refused")):
        assert command[:4] == ["gcloud", "monitoring", "policies", "create"]
        assert f"--policy-from-file={tmp_path / 'cfg'}/alert-{kind}-tpu-v6e-1.json" in command
        assert "--notification-channels=CHANNEL_ID" in command
