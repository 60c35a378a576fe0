"""The `flexTemplates:launch` request: its body, checked against the Dataflow API's own types.

One body serves three callers: `launch.submit --template` sends it, the
nightly Cloud Scheduler job posts it, and `gcloud_run_command` prints the
same launch as a `gcloud dataflow flex-template run` command. Every body is
parsed into `dataflow_v1beta3.LaunchFlexTemplateRequest` (unknown fields
rejected) before it is sent or written, so a malformed one never leaves here.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from google.cloud import dataflow_v1beta3

from launch.job import AUTOSCALING_API_NAMES, JobSettings

# FlexTemplateRuntimeEnvironment fields that `gcloud dataflow flex-template run` has a flag for.
_GCLOUD_FLAGS = {
    "tempLocation": "--temp-location",
    "stagingLocation": "--staging-location",
    "machineType": "--worker-machine-type",
    "additionalExperiments": "--additional-experiments",
    "numWorkers": "--num-workers",
    "maxWorkers": "--max-workers",
    "workerZone": "--worker-zone",
    "serviceAccountEmail": "--service-account-email",
}
# Fields without a flag travel as pipeline options (--additional-pipeline-options), in Beam's names.
_PIPELINE_OPTIONS = {"diskSizeGb": "disk_size_gb", "autoscalingAlgorithm": "autoscaling_algorithm", "sdkContainerImage": "sdk_container_image"}
_BEAM_AUTOSCALING = {api: beam for beam, api in AUTOSCALING_API_NAMES.items()}


def args_to_parameters(args: Sequence[str]) -> dict[str, str]:
    """`--key=value` / `--key value` options -> flex template parameters (one value per name)."""
    parameters: dict[str, str] = {}
    tokens = list(args)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--"):
            raise ValueError(f"expected an option, got {token!r}")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if not tokens or tokens[0].startswith("--"):
                raise ValueError(f"--{key} has no value; flex template parameters are KEY=VALUE")
            value = tokens.pop(0)
        if key in parameters and parameters[key] != value:
            raise ValueError(
                f"--{key} given twice; a flex template parameter takes one value (use one glob or a --manifest)"
            )
        parameters[key] = value
    return parameters


def launch_body(settings: JobSettings, template_path: str, pipeline_args: Sequence[str]) -> dict[str, Any]:
    """Body of `POST .../locations/REGION/flexTemplates:launch`."""
    body = {
        "launchParameter": {
            "jobName": settings.job_name,
            "containerSpecGcsPath": template_path,
            "parameters": args_to_parameters(pipeline_args),
            "environment": settings.flex_environment(),
        }
    }
    validated(body)
    return body


def validated(body: Mapping[str, Any]) -> dataflow_v1beta3.LaunchFlexTemplateRequest:
    """The body as the API's request type; raises on any field the API does not have."""
    return dataflow_v1beta3.LaunchFlexTemplateRequest.from_json(json.dumps(body))


def launch_url(project: str, region: str) -> str:
    return f"https://dataflow.googleapis.com/v1b3/projects/{project}/locations/{region}/flexTemplates:launch"


def send(project: str, region: str, body: Mapping[str, Any]) -> str:
    """Launch the flex template; returns the new job's id. Needs credentials (ADC)."""
    request = validated(body)
    request.project_id = project
    request.location = region
    response = dataflow_v1beta3.FlexTemplatesServiceClient().launch_flex_template(request=request)
    return response.job.id


def _gcloud_list(values: Sequence[str]) -> str:
    """gcloud list flag value; `^~^` switches the delimiter when a value holds a comma (tasks=ocr,caption)."""
    if not any("," in value for value in values):
        return ",".join(values)
    if any("~" in value for value in values):
        raise ValueError(f"cannot express {values} as a gcloud list: values hold both ',' and '~'")
    return "^~^" + "~".join(values)


def gcloud_run_command(project: str, region: str, body: Mapping[str, Any]) -> list[str]:
    """The same launch as `gcloud dataflow flex-template run` arguments."""
    launch = body["launchParameter"]
    command = [
        "gcloud", "dataflow", "flex-template", "run", launch["jobName"],
        f"--project={project}",
        f"--region={region}",
        f"--template-file-gcs-location={launch['containerSpecGcsPath']}",
        f"--parameters={_gcloud_list([f'{k}={v}' for k, v in launch['parameters'].items()])}",
    ]
    pipeline_options: list[str] = []
    for field, value in launch["environment"].items():
        if field in _GCLOUD_FLAGS:
            rendered = _gcloud_list(value) if isinstance(value, list) else str(value)
            command.append(f"{_GCLOUD_FLAGS[field]}={rendered}")
        elif field in _PIPELINE_OPTIONS:
            beam_value = _BEAM_AUTOSCALING.get(value, value) if field == "autoscalingAlgorithm" else value
            pipeline_options.append(f"{_PIPELINE_OPTIONS[field]}={beam_value}")
        elif field == "additionalPipelineOptions":
            pipeline_options.extend(value)
        else:
            raise ValueError(f"no gcloud flex-template run equivalent for environment field {field!r}")
    if pipeline_options:
        command.append(f"--additional-pipeline-options={_gcloud_list(pipeline_options)}")
    return command
