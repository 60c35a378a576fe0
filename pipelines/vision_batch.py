"""Batch OCR, captions and object detection over images and PDFs with Gemma 4 on vLLM.

    python -m pipelines.vision_batch --input data/scans --output out/run1 \\
        [--tasks ocr,caption,detect] [--task_file tasks.yaml] [--model DIR] [Beam options]

Graph (one stage per module under transforms/):

    MatchInputs -> PlanUnits [-> LimitUnits] -> Reshuffle [-> AttachAnswers] -> DecodeUnits -> RunTasks -> ParseCompletions -> results/
         \\______________\\______________________________________________________\\____________\\______________\\_________-> errors/

Every input item ends as result rows (one per task) or error rows, and
run_summary.json accounts for both and states the outcome.

Exit codes (`main`): 0 the run succeeded; 1 it failed (error budget
exceeded, nothing processed, storage down past its retry budget, or the run
itself broke); 2 usage error (one line, nothing started); 130 interrupted by
Ctrl-C (SIGINT); 143 terminated (SIGTERM). A failed or interrupted run
keeps nothing of its own in --output (pipelines/output_safety.py: it deletes
only what it can prove it wrote).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Iterator, NoReturn, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from engine import logs

from pipelines import output_safety

from configuration.options import PROG, JobConfig, JobRequest, UsageError, VisionBatchOptions, parse_command_line, validate
from engine import model_staging
from engine.checkpoint_shape import CheckpointShape
from engine.registry import ENGINES
from library import environment, storage
from library.errors import ERRORS_TAG
from library.progress import PROGRESS
from pipelines.models import resolve_model
from pipelines.runner import is_local, make_runner
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA
from schemas.uris import mask_credentials
from transforms import summary
from transforms import decode, incremental, parse, run_tasks, sources
from transforms.sinks import WriteTable, to_error_row

_LOG = logging.getLogger("vision_batch")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, the shell's convention

# This process's hold on its --output (lock, marker): only a claimed output is cleaned when the run is
# interrupted, so a signal during the checks never touches an earlier run's files.
_claim: Optional[output_safety.Claim] = None


def build_pipeline(pipeline: beam.Pipeline, config: JobConfig) -> beam.PCollection:
    """Attach the whole graph for `config` to `pipeline`; returns the run summary's step output (written last)."""
    # Workers (Dataflow VMs, local worker processes) then apply the job's GCS retry budget too.
    storage.add_worker_plugin(pipeline.options)
    files, match_errors = pipeline | "MatchInputs" >> sources.MatchInputs(
        config.inputs, config.manifests, config.manifest_column, config.selection
    )
    limit = config.selection.limit
    planned = files | "PlanUnits" >> beam.ParDo(decode.PlanUnits(config.limits, config.shards, limit)).with_outputs(
        ERRORS_TAG, main="units"
    )
    units = planned.units if limit is None else planned.units | "Limit" >> decode.LimitUnits(limit)
    # Fan page ranges, row groups and tar members out across workers: without
    # it every page of a long PDF is rendered and inferred by the worker that planned it.
    fanned = units | "FanOutUnits" >> beam.Reshuffle()
    history_tallies = []
    if config.incremental_from:
        fanned, scan_tallies = fanned | "AttachAnswers" >> incremental.AttachAnswers(
            config.incremental_from, config.run, config.tasks, config.engine, config.limits, config.shards, config.output,
            config.text_layer,
        )
        history_tallies.append(scan_tallies)
    decoded = fanned | "DecodeUnits" >> beam.ParDo(
        decode.DecodeUnits(config.limits, config.shards, config.tasks, config.text_layer)
    ).with_outputs(ERRORS_TAG, decode.SKIPPED_TAG, decode.LAYER_TAG, main="items")
    completed = decoded.items | "RunTasks" >> beam.ParDo(
        run_tasks.RunTasks(config.engine, config.tasks, config.progress_interval_s, max_retries=config.max_retries)
    ).with_outputs(ERRORS_TAG, main="completions")
    # PDF pages' answers from their text layers join the engine's on the way to the parse stage.
    from_layer = decoded[decode.LAYER_TAG] | "LayerCompletions" >> beam.FlatMap(lambda answers: answers.completions)
    parsed = (completed.completions, from_layer) | "AllCompletions" >> beam.Flatten() | "Parse" >> beam.ParDo(
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
        units | "TallyUnits" >> beam.Map(summary.tally_unit),
        summary.distinct_sources(units),
        decoded.items | "TallyItems" >> beam.Map(summary.tally_item),
        decoded[decode.SKIPPED_TAG] | "TallySkipped" >> beam.Map(summary.tally_skipped),
        decoded[decode.LAYER_TAG] | "TallyLayerAnswers" >> beam.Map(summary.tally_layer_answers),
        *history_tallies,
        parsed.rows | "TallyResults" >> beam.Map(summary.tally_result),
        error_rows | "TallyErrors" >> beam.Map(summary.tally_error),
    ) | "AllTallies" >> beam.Flatten()
    return (tallies, results_written, errors_written) | "RunSummary" >> summary.WriteRunSummary(
        config.summary_config(),
        datetime.datetime.now(datetime.timezone.utc),
        pipeline.options.get_all_options(drop_default=True),
        config.engine.model_path,
    )


def prepare(request: JobRequest) -> tuple[JobConfig, output_safety.Claim]:
    """Everything between the command line and the graph: output checks, model, settings, warnings, the output's claim.

    The checks that need no model come first, so a mistake is reported in
    seconds; the output is claimed (locked, an earlier run cleared, the
    marker written) only once nothing else can refuse the run.
    """
    global _claim
    options, opts = request.options, request.opts
    warnings = output_safety.check(options)
    model = resolve_model(opts.model, opts.model_id, opts.tiny_preset)
    config = JobConfig.resolve(
        request, model.path, model.model_id, model.is_random, checkpoint=CheckpointShape.read(model.path)
    )
    _claim = output_safety.claim(options, config.run.run_id)
    # This process waits for the run and reports its outcome (exit code) itself; a job nobody
    # waits for (another runner) fails in its own last step instead.
    return dataclasses.replace(config, fail_job_on_failure=not is_local(options), warnings=warnings), _claim


def run(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the job to completion and return the run summary (also written to OUT/run_summary.json).

    Raises UsageError for a mistake in the command line or the output location,
    RunFailed when the pipeline itself failed (its partial outputs removed).
    """
    return run_checked(validate(parse_command_line(argv)))


def run_checked(request: JobRequest) -> dict[str, Any]:
    """`run` for a command line `validate` has already checked."""
    options = request.options
    # Before make_runner: the local runner hands its workers the options as they are when it is built.
    storage.add_worker_plugin(options)
    FileSystems.set_options(options)  # the launcher's own GCS calls: this job's budget, not an earlier pipeline's
    config, claim = prepare(request)
    try:
        if config.model_is_random:
            _LOG.warning(summary.RANDOM_MODEL_WARNING)
        _LOG.info(mask_credentials(
            f"run {config.run.run_id}: {', '.join(config.inputs + config.manifests)} -> {config.output}, "
            f"tasks {','.join(t.name for t in config.tasks)}, model {config.run.model_id}"
        ))
        PROGRESS.reset()
        pipeline = beam.Pipeline(runner=make_runner(options), options=options)
        build_pipeline(pipeline, config)
        try:
            state = pipeline.run().wait_until_finish()
        except Exception as exc:
            if _summary_written(config.output):
                # The run finished and its last step failed it (summary.JobFailed, on runners this
                # process does not report for): a complete run with state FAILED, kept as written.
                raise RunFailed(exc, f"the run's outputs and {summary.SUMMARY_FILE} under {config.output} are kept") from exc
            raise RunFailed(exc, _remove_partial_outputs(claim)) from exc
        finally:
            PROGRESS.stop()
    finally:
        claim.release()
    written = summary.read_summary(config.output)
    if written is None:
        raise RuntimeError(f"run ended in state {state} without writing {config.output}/{summary.SUMMARY_FILE}")
    return written


class RunFailed(RuntimeError):
    """The pipeline failed; `line` says why in one line (the storage operation and object, when storage failed)."""

    def __init__(self, cause: BaseException, cleanup: str):
        self.line = f"{storage.failure_line(cause) or storage.one_line(cause)}; {cleanup}"
        super().__init__(self.line)


def _summary_written(output: str) -> bool:
    try:
        return summary.read_summary(output) is not None
    except Exception:  # noqa: BLE001 - storage down: no complete run can be confirmed, so it is not one
        return False


def _remove_partial_outputs(claim: output_safety.Claim) -> str:
    """Remove what the failed run wrote in its --output (foreign files stay); say what happened."""
    output = claim.output
    try:
        removed = claim.remove_run()
    except Exception as exc:  # noqa: BLE001 - storage may still be down: report, don't mask the run's own failure
        return f"its partial outputs under {output} could not be removed ({storage.failure_line(exc) or storage.one_line(exc)})"
    return f"removed its {removed} partial output file(s) under {output}" if removed else f"no outputs were left under {output}"


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (raised in the main thread by the handler)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: Any) -> NoReturn:
    # A second signal while shutting down ends the process at once.
    signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_SIGNAL[signal.SIGINT]))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(EXIT_SIGNAL[signal.SIGTERM]))
    raise Interrupted(signum)


@contextlib.contextmanager
def private_tempdir() -> Iterator[str]:
    """One temporary folder for everything the run puts in the system's temp dir, removed at the end.

    Beam's pipeline folder and vLLM's rendezvous file otherwise stay behind
    when a run is interrupted. Weights staged from gs:// keep their shared
    location: they are meant to outlive the run.
    """
    os.environ.setdefault(environment.MODEL_DIR.name, str(model_staging.default_root()))
    previous_dir, previous_env = tempfile.tempdir, os.environ.get("TMPDIR")
    path = tempfile.mkdtemp(prefix="vision-batch-run-")
    tempfile.tempdir = os.environ["TMPDIR"] = path  # TMPDIR: for worker processes the runner starts
    try:
        yield path
    finally:
        tempfile.tempdir = previous_dir
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env
        shutil.rmtree(path, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """Processes started (directly or not) by `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis.
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _terminate_worker_processes() -> None:
    """The local runner's worker processes (--direct_running_mode=multi_processing) end with the run."""
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)


def _stop(signum: int, started: float, claim: Optional[output_safety.Claim], tempdir: str) -> NoReturn:
    """Stop admitting, cancel the engine's work, remove what the run wrote, say so in one line, exit."""
    name = signal.Signals(signum).name
    # The run's threads now fail one after another (cancelled requests, failed bundles): their
    # errors are the expected consequence of stopping, not news.
    logging.disable(logging.CRITICAL)
    threading.excepthook = lambda _: None
    ENGINES.stop_all(f"run interrupted by {name}")
    _terminate_worker_processes()
    done = PROGRESS.line().removeprefix("progress: ").split(", ETA")[0] if PROGRESS.counted else "work in worker processes"
    PROGRESS.stop()
    removed = "removed its temporary files"
    if claim is not None:  # None: interrupted before --output was claimed, which is then left as it was
        try:
            claim.remove_run()  # what the run wrote (its marker and table files); anything else stays
            removed += f" and everything it had begun to write under {claim.output}"
        except Exception as exc:  # noqa: BLE001 - report, still exit with the signal's code
            removed += f"; could not clean {claim.output} ({exc}): a rerun of the same command clears it"
        claim.release()
    shutil.rmtree(tempdir, ignore_errors=True)
    line = (
        f"{PROG}: interrupted by {name} after {time.monotonic() - started:.0f} s ({done}): stopped the engine and "
        f"{removed}. Nothing of this run is kept (outputs are published only when a run completes); "
        f"rerun the same command to start over."
    )
    print(mask_credentials(line), file=sys.stderr, flush=True)
    # Beam's worker threads and vLLM's step loop may still be unwinding: leave without waiting for them.
    os._exit(EXIT_SIGNAL[signal.Signals(signum)])


@contextlib.contextmanager
def restoring_process_state() -> Iterator[None]:
    """For calling `main` inside another program (tests, the docs check): puts back what it sets process-wide.

    That is the working directory, the environment, logging (handlers and the levels `logs.configure`
    sets) and the SIGINT/SIGTERM handlers.
    """
    cwd, environment = os.getcwd(), dict(os.environ)
    root = logging.getLogger()
    handlers = list(root.handlers)
    names = ("", *logs.OUR_LOGGERS, *logs.QUIET_LOGGERS)
    levels = {name: logging.getLogger(name).level for name in names}
    handlers_of = {signum: signal.getsignal(signum) for signum in EXIT_SIGNAL}
    try:
        yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environment)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for signum, handler in handlers_of.items():
            signal.signal(signum, handler)
        logging.captureWarnings(False)


def _report(written: dict[str, Any]) -> int:
    counts = written["counts"]
    output = written["config"]["output"]
    lines = [
        f"\nrun {written['run_id']} {written['state']}: {written['state_reason']}",
        f"  {counts['items']} items, {counts['result_rows']} result rows, {counts['error_rows']} error rows, "
        f"{counts['skipped_tasks']} tasks skipped, {written['wall_time_s']} s",
        f"  results: {output}/results/\n  errors:  {output}/errors/\n  summary: {output}/{summary.SUMMARY_FILE}",
    ]
    lines += [f"WARNING: {warning}" for warning in written.get("warnings", [])]
    print(mask_credentials("\n".join(lines)), flush=True)
    return EXIT_OK if written["state"] == summary.SUCCEEDED else EXIT_FAILED


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: run, report the outcome, return the exit code (see the module docstring)."""
    global _claim
    started, _claim = time.monotonic(), None
    try:
        options = parse_command_line(argv)
        # Before the checks that read (task file, manifests): the client libraries' lines while
        # storage is reached (Beam's credential look-up retries, with tracebacks) go through this log.
        logs.configure(options.view_as(VisionBatchOptions).log_level, local=is_local(options))
        request = validate(options)
    except UsageError as exc:
        print(f"{PROG}: error: {mask_credentials(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - e.g. storage down while the task file is read
        return _failed(exc)
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    # The run goes on a thread; this (main) thread only waits, so a signal never lands inside
    # Beam's or vLLM's code, and the handler can stop the engine and clean up deterministically.
    with private_tempdir() as tempdir, concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="run") as pool:
        future = pool.submit(run_checked, request)
        try:
            while True:
                try:
                    written = future.result(timeout=0.5)
                    break
                except concurrent.futures.TimeoutError:
                    continue
        except Interrupted as interrupt:
            _stop(interrupt.signum, started, _claim, tempdir)
        except UsageError as exc:
            print(f"{PROG}: error: {mask_credentials(str(exc))}", file=sys.stderr)
            return EXIT_USAGE
        except Exception as exc:  # noqa: BLE001 - not a user mistake
            return _failed(exc)
    return _report(written)


def _failed(exc: Exception) -> int:
    """A failed run, or storage down already at launch: one line; anything else keeps its traceback."""
    line = exc.line if isinstance(exc, RunFailed) else storage.failure_line(exc)
    if line is not None:
        print(f"\nrun failed: {mask_credentials(line)}", file=sys.stderr)
        return EXIT_FAILED
    _LOG.exception("run failed", exc_info=exc)
    print(f"{PROG}: the run failed (traceback above); a rerun of the same command starts it over", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
