"""Build the pipeline for a full Dataflow option list and submit it, without waiting.

The flex template launcher runs this file (FLEX_TEMPLATE_PYTHON_PY_FILE in
launch/flex_template/Dockerfile); `launch.submit` uses `submit` for direct
submissions and `build` for `--dry-run`. Unlike `pipelines.vision_batch.run`
it neither waits for the job nor writes run_summary.json: a launcher VM must
not block for the hours a TPU job runs. The Dataflow UI shows the counters.

`{date}` in any option value becomes the launch's UTC date (YYYY-MM-DD), so a
static nightly schedule writes each night's output to its own location.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import sys
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner
from apache_beam.runners.runner import PipelineResult

from launch.image import WORKER_PYTHON
from pipelines.models import resolve_model
from pipelines.options import JobConfig, VisionBatchOptions
from pipelines.output_safety import guard
from pipelines.vision_batch import build_pipeline
from transforms.model_staging import is_remote

DATE_PLACEHOLDER = "{date}"
_LOG = logging.getLogger("launch.run_dataflow")


def expand_date(argv: Sequence[str], today: datetime.date) -> list[str]:
    return [arg.replace(DATE_PLACEHOLDER, today.isoformat()) for arg in argv]


def job_config(options: PipelineOptions, check_model: bool) -> JobConfig:
    """The pipeline's settings for a TPU job: always a real checkpoint in GCS.

    `check_model=False` (dry runs) skips resolve_model's existence check, which reads GCS.
    """
    opts = options.view_as(VisionBatchOptions)
    if not opts.model or not is_remote(opts.model):
        raise ValueError("TPU jobs need --model gs://BUCKET/PATH: a Gemma 4 checkpoint staged in GCS")
    if check_model:
        model = resolve_model(opts.model, opts.model_id, opts.tiny_preset)
        return JobConfig.from_options(options, model.path, model.model_id, model.is_random)
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
        config = dataclasses.replace(config, warnings=guard(options))
    pipeline = beam.Pipeline(runner=DataflowRunner(), options=options)
    build_pipeline(pipeline, config)
    return pipeline, config


def build_offline(argv: Sequence[str]) -> int:
    """Build the job graph without network or credentials; returns its number of transforms.

    Beam's own `--dry_run` flag skips the GCS checks of option validation,
    and the model is not looked up: every option is still parsed and
    validated by Beam and by the pipeline, and the graph translated.
    """
    pipeline, _ = build([*argv, "--dry_run=True"], check_model=False)
    return len(pipeline.to_runner_api().components.transforms)


def submit(argv: Sequence[str]) -> PipelineResult:
    """Submit the job and return as soon as Dataflow accepted it."""
    running = "%d.%d" % sys.version_info[:2]
    if running != WORKER_PYTHON:
        # The graph is pickled here and unpickled on the workers: bytecode differs between versions.
        raise RuntimeError(
            f"submitting from Python {running}, but the TPU workers run {WORKER_PYTHON}: submit from a "
            f"Python {WORKER_PYTHON} environment or launch the flex template (launch.submit --template ...)"
        )
    pipeline, config = build(argv)
    result = pipeline.run()
    cloud = pipeline.options.view_as(GoogleCloudOptions)
    _LOG.info(
        "submitted run %s: https://console.cloud.google.com/dataflow/jobs/%s/%s?project=%s",
        config.run.run_id, cloud.region, result.job_id(), cloud.project,
    )
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    submit(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
