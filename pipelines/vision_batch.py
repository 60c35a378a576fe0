"""Batch OCR, captions and object detection over images and PDFs with Gemma 4 on vLLM.

    python -m pipelines.vision_batch --input 'data/scans/**' --output out/run1 \
        [--tasks ocr,caption,detect] [--model DIR] [Beam options]

Graph (one stage per module under transforms/):

    MatchInputs -> PlanUnits -> Reshuffle [-> AttachAnswers] -> DecodeUnits -> RunTasks -> ParseCompletions -> results/
         \\______________\\______________________________________________\\____________\\______________\\_________-> errors/

Every input item ends as result rows (one per task) or error rows, and
run_summary.json accounts for both.
"""
from __future__ import annotations

import datetime
import logging
import sys
from typing import Any, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.checkpoint_shape import CheckpointShape
from pipelines.models import resolve_model
from pipelines.options import JobConfig, VisionBatchOptions
from pipelines.runner import make_runner
from pipelines import summary
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA
from transforms import decode, incremental, parse, run_tasks, sources, storage
from transforms.errors import ERRORS_TAG
from transforms.sinks import WriteTable, remove_new_objects, table_objects, to_error_row

_LOG = logging.getLogger("vision_batch")


def build_pipeline(pipeline: beam.Pipeline, config: JobConfig) -> None:
    """Attach the whole graph for `config` to `pipeline`."""
    # Workers (Dataflow VMs, local worker processes) then apply the job's GCS retry budget too.
    storage.add_worker_plugin(pipeline.options)
    files, match_errors = pipeline | "MatchInputs" >> sources.MatchInputs(
        config.inputs, config.manifests, config.manifest_column
    )
    planned = files | "PlanUnits" >> beam.ParDo(decode.PlanUnits(config.limits, config.shards)).with_outputs(
        ERRORS_TAG, main="units"
    )
    # Fan page ranges, row groups and tar members out across workers: without
    # it every page of a long PDF is rendered and inferred by the worker that planned it.
    units = planned.units | "FanOutUnits" >> beam.Reshuffle()
    history_tallies = []
    if config.incremental_from:
        units, scan_tallies = units | "AttachAnswers" >> incremental.AttachAnswers(
            config.incremental_from, config.run, config.tasks, config.engine, config.limits, config.shards
        )
        history_tallies.append(scan_tallies)
    decoded = units | "DecodeUnits" >> beam.ParDo(
        decode.DecodeUnits(config.limits, config.shards, [t.name for t in config.tasks])
    ).with_outputs(ERRORS_TAG, decode.SKIPPED_TAG, main="items")
    completed = decoded.items | "RunTasks" >> beam.ParDo(
        run_tasks.RunTasks(config.engine, config.tasks, config.progress_interval_s)
    ).with_outputs(ERRORS_TAG, main="completions")
    parsed = completed.completions | "Parse" >> beam.ParDo(
        parse.ParseCompletions(config.tasks, config.run)
    ).with_outputs(ERRORS_TAG, main="rows")

    error_rows = (
        (match_errors, planned[ERRORS_TAG], decoded[ERRORS_TAG], completed[ERRORS_TAG], parsed[ERRORS_TAG])
        | "AllErrors" >> beam.Flatten()
        | "ErrorRows" >> beam.Map(to_error_row, config.run)
    )
    results_written = parsed.rows | "WriteResults" >> WriteTable(config.output, "results", RESULTS_SCHEMA, config.num_output_shards)
    errors_written = error_rows | "WriteErrors" >> WriteTable(config.output, "errors", ERRORS_SCHEMA, config.num_output_shards)

    tallies = (
        files | "TallyFiles" >> beam.Map(summary.tally_file),
        planned.units | "TallyUnits" >> beam.Map(summary.tally_unit),
        summary.distinct_sources(planned.units),
        decoded.items | "TallyItems" >> beam.Map(summary.tally_item),
        decoded[decode.SKIPPED_TAG] | "TallySkipped" >> beam.Map(summary.tally_skipped),
        *history_tallies,
        parsed.rows | "TallyResults" >> beam.Map(summary.tally_result),
        error_rows | "TallyErrors" >> beam.Map(summary.tally_error),
    ) | "AllTallies" >> beam.Flatten()
    (tallies, results_written, errors_written) | "RunSummary" >> summary.WriteRunSummary(
        config,
        datetime.datetime.now(datetime.timezone.utc),
        pipeline.options.get_all_options(drop_default=True),
        config.engine.model_path,
    )


def run(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the job to completion and return the run summary (also written to OUT/run_summary.json)."""
    options = PipelineOptions(argv)
    # Before make_runner: the local runner hands its workers the options as they are when it is built.
    storage.add_worker_plugin(options)
    FileSystems.set_options(options)  # the launcher's own GCS calls: this job's budget, not an earlier pipeline's
    opts = options.view_as(VisionBatchOptions)
    model = resolve_model(opts.model, opts.model_id, opts.tiny_preset)
    config = JobConfig.from_options(
        options, model.path, model.model_id, model.is_random, checkpoint=CheckpointShape.read(model.path)
    )
    if model.is_random:
        _LOG.warning("=" * 72)
        _LOG.warning(summary.RANDOM_MODEL_WARNING)
        _LOG.warning("=" * 72)
    _LOG.info("run %s: %s -> %s, tasks %s, model %s", config.run.run_id, list(config.inputs), config.output,
              [t.name for t in config.tasks], config.run.model_id)

    stale = f"{config.output}/{summary.SUMMARY_FILE}"
    if FileSystems.exists(stale):
        FileSystems.delete([stale])  # a summary must never describe another run's files
    before = table_objects(config.output)
    pipeline = beam.Pipeline(runner=make_runner(options), options=options)
    build_pipeline(pipeline, config)
    try:
        state = pipeline.run().wait_until_finish()
    except Exception as exc:
        raise RunFailed(exc, _remove_partial_outputs(config.output, before)) from exc
    written = summary.read_summary(config.output)
    if written is None:
        raise RuntimeError(f"run ended in state {state} without writing {stale}")
    return written


class RunFailed(RuntimeError):
    """The pipeline failed; `line` says why in one line (the storage operation and object, when storage failed)."""

    def __init__(self, cause: BaseException, cleanup: str):
        self.line = f"{storage.failure_line(cause) or storage.one_line(cause)}; {cleanup}"
        super().__init__(self.line)


def _remove_partial_outputs(output: str, before: dict[str, float]) -> str:
    """Remove what the failed run left under its tables; say what happened, for the failure line."""
    try:
        removed = remove_new_objects(output, before)
    except Exception as exc:  # noqa: BLE001 - storage may still be down: report, don't mask the run's own failure
        return f"its partial outputs under {output} could not be removed ({storage.failure_line(exc) or storage.one_line(exc)})"
    return f"removed its {len(removed)} partial output file(s)/temp dir(s) under {output}" if removed else f"no outputs were left under {output}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One INFO line per string type hint in our (postponed-annotation) DoFns: noise.
    logging.getLogger("apache_beam.typehints").setLevel(logging.WARNING)
    try:
        written = run(argv)
    except Exception as exc:
        # A failed run, or storage down already at launch: one line; anything else keeps its traceback.
        line = exc.line if isinstance(exc, RunFailed) else storage.failure_line(exc)
        if line is None:
            raise
        print(f"\nrun failed: {line}", file=sys.stderr)
        return 1
    counts = written["counts"]
    output = written["config"]["output"]
    print(
        f"\nrun {written['run_id']} {written['state']} in {written['wall_time_s']} s: "
        f"{counts['items']} items, {counts['result_rows']} result rows, {counts['error_rows']} error rows "
        f"(balanced: {written['accounting']['balanced']})\n"
        f"  results: {output}/results/\n  errors:  {output}/errors/\n  summary: {output}/{summary.SUMMARY_FILE}"
    )
    if "warning" in written:
        print(f"\nWARNING: {written['warning']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
