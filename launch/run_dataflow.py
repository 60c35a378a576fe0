"""Build the pipeline for a full Dataflow option list and submit it, without waiting.

The flex template launcher runs this file (FLEX_TEMPLATE_PYTHON_PY_FILE in
launch/flex_template/Dockerfile) with `--template_location=<staging>/
template_launches/<job id>/job_object`: Beam then writes the job there and
submits nothing (apiclient.create_job returns no job), and the launcher
submits it. `launch.submit` uses `submit` for direct submissions (no
template location: Beam creates the job) and `build` for `--dry-run`.
Neither path waits for the job: a launcher VM must not block for the hours
an accelerator job runs. The job writes run_summary.json itself.

`{date}` in any option value becomes the launch's UTC date (YYYY-MM-DD), so a
static nightly schedule writes each night's output to its own location.
With `--preflight_findings` (launch.preflight) the job is a canary: the
probe of launch/canary.py runs after its summary.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

from configuration.options import JobConfig, VisionBatchOptions
from engine.checkpoint_shape import CheckpointShape
from engine.model_staging import is_remote
from launch import canary, image
from pipelines import output_safety
from pipelines.models import resolve_model
from pipelines.vision_batch import build_pipeline

DATE_PLACEHOLDER = "{date}"
_LOG = logging.getLogger("launch.run_dataflow")


def expand_date(argv: Sequence[str], today: datetime.date) -> list[str]:
    return [arg.replace(DATE_PLACEHOLDER, today.isoformat()) for arg in argv]


def job_config(options: PipelineOptions, check_model: bool) -> JobConfig:
    """The pipeline's settings for an accelerator job: always a real checkpoint in GCS.

    `check_model=False` (dry runs) skips resolve_model's existence check, which reads GCS.
    """
    opts = options.view_as(VisionBatchOptions)
    if not opts.model or not is_remote(opts.model):
        raise ValueError("Dataflow jobs need --model gs://BUCKET/PATH: a Gemma 4 checkpoint staged in GCS")
    if check_model:
        model = resolve_model(opts.model, opts.model_id, opts.tiny_preset)
        # The checkpoint's shape, as a local run reads it: its config.json may need fixing before vLLM starts
        # (engine/profiles.py with_num_soft_tokens).
        return JobConfig.from_options(
            options, model.path, model.model_id, model.is_random, checkpoint=CheckpointShape.read(model.path)
        )
    path = opts.model.rstrip("/")
    return JobConfig.from_options(options, path, opts.model_id or path, model_is_random=False)


def build(argv: Sequence[str], check_model: bool = True) -> tuple[beam.Pipeline, JobConfig]:
    """The job's pipeline on the DataflowRunner, graph attached, not run."""
    options = PipelineOptions(expand_date(argv, datetime.datetime.now(datetime.timezone.utc).date()))
    runner = options.view_as(StandardOptions).runner
    if runner not in (None, "DataflowRunner"):  # the flex template launcher may leave it unset
        raise ValueError(f"this entry point submits to Dataflow; got --runner={runner}")
    config = job_config(options, check_model)
    if check_model:  # a real launch (not an offline dry run): --output is checked and an unfinished run cleared
        warnings = output_safety.check(options)
        # Claimed (marker written, an earlier run of ours cleared) and let go: nothing here lives as long as
        # the job to keep a lock fresh. Dataflow refuses a second job of the same name instead (README).
        output_safety.claim(options, config.run.run_id).release()
        config = dataclasses.replace(config, warnings=warnings)
    pipeline = beam.Pipeline(runner=DataflowRunner(), options=options)
    build_job_graph(pipeline, config)
    return pipeline, config


def build_job_graph(pipeline: beam.Pipeline, config: JobConfig) -> None:
    """The job's graph; a preflight canary's (--preflight_findings) also gets the probe behind its summary."""
    summary = build_pipeline(pipeline, config)
    canary.attach(pipeline, summary, config.engine)


def build_offline(argv: Sequence[str]) -> int:
    """Build the job graph without network or credentials; returns its number of transforms.

    Beam's own `--dry_run` flag skips the GCS checks of option validation,
    and the model is not looked up: every option is still parsed and
    validated by Beam and by the pipeline, and the graph translated.
    """
    pipeline, _ = build([*argv, "--dry_run=True"], check_model=False)
    return len(pipeline.to_runner_api().components.transforms)


@dataclasses.dataclass(frozen=True)
class Submission:
    """What one invocation produced: a job Dataflow accepted, or a job object the flex launcher submits."""

    run_id: str
    job_id: Optional[str]  # None when the job was written to template_location
    template_location: Optional[str]


def check_pickling_python(template_location: Optional[str]) -> None:
    """Refuse to pickle the job graph on a Python other than the workers'.

    The graph is pickled here and unpickled on the workers, and bytecode
    differs between Python versions. The flex template launcher image is
    exempt: its build asserts it runs the workers' Python
    (launch/flex_template/Dockerfile, which also sets
    FLEX_TEMPLATE_PYTHON_PY_FILE, the variable the launcher reads).
    """
    running = "%d.%d" % sys.version_info[:2]
    if running == image.WORKER_PYTHON or os.environ.get("FLEX_TEMPLATE_PYTHON_PY_FILE"):
        return
    where = "writing a template" if template_location else "submitting"
    raise RuntimeError(
        f"{where} from Python {running}, but the workers run {image.WORKER_PYTHON}: submit from a "
        f"Python {image.WORKER_PYTHON} environment or launch the flex template (launch.submit --template ...)"
    )


def submit(argv: Sequence[str]) -> Submission:
    """Create the job (or, under the flex launcher, its job object) and return without waiting."""
    template_location = PipelineOptions(list(argv)).view_as(GoogleCloudOptions).template_location
    check_pickling_python(template_location)
    pipeline, config = build(argv)
    result = pipeline.run()
    cloud = pipeline.options.view_as(GoogleCloudOptions)
    if not result.has_job:
        # Beam's create_job wrote the job to --template_location and returned no job (nothing to name):
        # the flex launcher submits it. Beam's own examples test has_job for this case (wordcount_with_metrics).
        _LOG.info("run %s: job object written to %s for the Dataflow launcher", config.run.run_id, template_location)
        return Submission(config.run.run_id, None, template_location)
    _LOG.info(
        "submitted run %s: https://console.cloud.google.com/dataflow/jobs/%s/%s?project=%s",
        config.run.run_id, cloud.region, result.job_id(), cloud.project,
    )
    return Submission(config.run.run_id, result.job_id(), None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    submit(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
