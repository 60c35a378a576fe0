"""Pipeline options: the user-facing configuration, in one place.

Beam parses these beside its own options (runner, workers, ...), so one
command line configures both, and Dataflow shows them in the job page.
`JobConfig.from_options` turns them into the typed settings each stage takes.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
from typing import Any, Mapping, Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import engine_profiles
from pipelines.checkpoint_shape import CheckpointShape
from pipelines.tiny_checkpoint import DEFAULT_PRESET, PRESETS
from schemas.records import RunInfo
from transforms.decode import DecodeLimits
from transforms.engine import EngineSettings
from transforms.prompts import (
    DEFAULT_TASKS,
    TASKS,
    VISION_TOKEN_BUDGETS,
    TaskSpec,
    parse_task_list,
    prompt_version,
    with_max_tokens,
    with_thinking_budget,
)
from transforms.shards import ShardSettings
from transforms.storage import RetryBudget

_DEFAULT_LIMITS = DecodeLimits()
_DEFAULT_RETRY = RetryBudget()


class VisionBatchOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        group = parser.add_argument_group("vision batch")
        group.add_argument(
            "--input", dest="input", action="append",
            help="Glob of input files (local path or gs:// URI); repeat for several. Images and PDFs.",
        )
        group.add_argument(
            "--manifest", dest="manifest", action="append", default=None,
            help="File listing inputs, one URI per entry: text (one per line), CSV or Parquet "
                 "(column --manifest_column). Relative entries are relative to the manifest. "
                 "Repeatable, or comma-separated.",
        )
        group.add_argument("--manifest_column", default="uri", help="Column of CSV/Parquet manifests holding the URIs.")
        group.add_argument("--output", help="Output location: results/, errors/ and run_summary.json go under it.")
        group.add_argument(
            "--num_output_shards", type=int, default=0,
            help="Files per output table; 0 lets the runner write one per bundle. Set it for large runs "
                 "whose downstream readers prefer a fixed file count (aim for 100 MB - 1 GB per file).",
        )
        group.add_argument(
            "--incremental_from", dest="incremental_from", action="append", default=None,
            help="Earlier output location; (content, task, model, prompt version) pairs it already answered "
                 "are skipped. Globs allowed (e.g. gs://b/nightly/*). Repeatable, or comma-separated. "
                 "Locations without results are ignored.",
        )
        group.add_argument(
            "--parquet_id_column", default=ShardSettings.parquet_id_column,
            help="Parquet shards: column naming each row (default: row number when absent).",
        )
        group.add_argument(
            "--parquet_bytes_column", default=ShardSettings.parquet_bytes_column,
            help="Parquet shards: column holding the image/PDF bytes (binary, or a struct with a 'bytes' field).",
        )
        group.add_argument(
            "--parquet_passthrough_columns", default="",
            help="Parquet shards: comma-separated columns copied into each row's metadata JSON.",
        )
        group.add_argument(
            "--tasks", default=",".join(DEFAULT_TASKS),
            help=f"Comma-separated subset of {','.join(TASKS)} (default: all).",
        )
        group.add_argument(
            "--model", default=None,
            help="Hugging Face-format Gemma 4 checkpoint directory. Default: the project's tiny "
                 "random-weight checkpoint (outputs are random; for tests and demos only).",
        )
        group.add_argument(
            "--model_id", default=None,
            help="Model name written to every row and used in incremental-run keys (default: --model as given).",
        )
        group.add_argument(
            "--tiny_preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
            help="Which tiny random-weight checkpoint the default model uses: one per Gemma 4 architecture "
                 "(pipelines/tiny_checkpoint.py).",
        )
        group.add_argument(
            "--engine_profile", default="cpu-tiny", choices=sorted(engine_profiles.PROFILES),
            help="Named vLLM engine profile (see pipelines/engine_profiles.py).",
        )
        group.add_argument(
            "--engine_arg", dest="engine_arg", action="append", default=None, metavar="KEY=VALUE",
            help="Override one vLLM engine argument of the profile; VALUE is JSON or a plain string. Repeatable.",
        )
        group.add_argument(
            "--structured_output", default="profile", choices=["profile", "on", "off"],
            help="Constrain detection JSON with a schema: the profile's choice (TPU: off), or force it.",
        )
        group.add_argument(
            "--xla_cache_path", default=None,
            help="Persistent XLA compile cache (local or gs:// directory), exported to each worker's engine as "
                 "VLLM_XLA_CACHE_PATH. TPU: saves a ~30-minute compile per worker once filled (launch/ sets it).",
        )
        group.add_argument("--max_in_flight", type=int, default=None, help="Override the profile's in-flight request limit.")
        group.add_argument(
            "--host_feeders", type=int, default=None,
            help="Worker processes of one host that feed one shared engine core (default: the profile's; 1: an "
                 "engine per process). The profile's in-flight limit and image cache are split between them.",
        )
        group.add_argument(
            "--vision_tokens", type=int, default=None, choices=VISION_TOKEN_BUDGETS,
            help="Image soft-token budget per request (Gemma 4: 70/140/280/560/1120). Default: the profile's, "
                 "else the checkpoint's.",
        )
        group.add_argument(
            "--thinking", default="off", choices=["off", "on"],
            help="Gemma 4 thinking mode: the model reasons before answering; the thought goes to the results' "
                 "thought column and each task gets extra output tokens for it. Slower and costlier.",
        )
        group.add_argument(
            "--max_tokens", dest="max_tokens", action="append", default=None, metavar="TASK=N",
            help="Override a task's output token limit, e.g. ocr=512 (or ocr=512,caption=64). Repeatable.",
        )
        group.add_argument("--pdf_dpi", type=float, default=_DEFAULT_LIMITS.pdf_dpi, help="PDF render resolution.")
        group.add_argument(
            "--pages_per_unit", type=int, default=_DEFAULT_LIMITS.pages_per_unit,
            help="Pages of one document decoded together before fanning out.",
        )
        group.add_argument("--max_pages", type=int, default=_DEFAULT_LIMITS.max_pages, help="Documents with more pages become an error row.")
        group.add_argument("--max_file_bytes", type=int, default=_DEFAULT_LIMITS.max_file_bytes, help="Larger files become an error row.")
        group.add_argument(
            "--max_image_pixels", type=int, default=_DEFAULT_LIMITS.max_image_pixels,
            help="Images/pages with more pixels become an error row (decompression-bomb guard).",
        )
        group.add_argument(
            "--max_image_side", type=int, default=_DEFAULT_LIMITS.max_side,
            help="Images are downscaled to this longest side before the engine.",
        )
        group.add_argument(
            "--progress_interval_s", type=float, default=30.0,
            help="Seconds between progress lines per worker process (0: none).",
        )
        group.add_argument("--run_id", default=None, help="Run identifier written to every row (default: UTC time + random suffix).")
        _add_storage_retry_args(parser.add_argument_group("storage retries (gs://)"))


def _add_storage_retry_args(group: Any) -> None:
    """Retry budget of every GCS request, in every worker (transforms/storage.py). Defaults: the client library's."""
    group.add_argument(
        "--gcs_retry_timeout_s", type=float, default=_DEFAULT_RETRY.timeout_s,
        help="Seconds one GCS request may keep retrying 429/5xx/resets/timeouts before the run fails naming the "
             "object and operation.",
    )
    group.add_argument(
        "--gcs_retry_initial_delay_s", type=float, default=_DEFAULT_RETRY.initial_delay_s,
        help="Bound on the first wait between attempts; the bound doubles per attempt (waits are random below it).",
    )
    group.add_argument(
        "--gcs_retry_max_delay_s", type=float, default=_DEFAULT_RETRY.max_delay_s,
        help="Bound on any one wait between attempts.",
    )


def split_commas(values: Optional[Sequence[str]]) -> tuple[str, ...]:
    """Repeated options may also hold comma-separated lists: a flex-template parameter takes one value."""
    return tuple(part.strip() for value in values or () for part in value.split(",") if part.strip())


def parse_key_values(pairs: Optional[Sequence[str]], what: str) -> dict[str, str]:
    result = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} must look like KEY=VALUE, got {pair!r}")
        result[key.strip()] = value.strip()
    return result


def parse_json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_engine_args(pairs: Optional[Sequence[str]]) -> dict[str, Any]:
    """`--engine_arg KEY=VALUE` pairs -> engine argument overrides (VALUE as JSON, else a string)."""
    return {key: parse_json_value(value) for key, value in parse_key_values(pairs, "--engine_arg").items()}


def new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Typed settings for every stage, resolved once at launch."""

    inputs: tuple[str, ...]
    manifests: tuple[str, ...]
    manifest_column: str
    incremental_from: tuple[str, ...]
    shards: ShardSettings
    output: str
    num_output_shards: int
    progress_interval_s: float
    tasks: tuple[TaskSpec, ...]
    engine: EngineSettings
    limits: DecodeLimits
    run: RunInfo
    model_is_random: bool

    @staticmethod
    def from_options(
        options: PipelineOptions, model_path: str, model_id: str, model_is_random: bool,
        checkpoint: Optional[CheckpointShape] = None,
    ) -> "JobConfig":
        """`checkpoint`: the model's shape, when known, so the engine profile checks and fits it."""
        opts = options.view_as(VisionBatchOptions)
        if not opts.input and not opts.manifest:
            raise ValueError("--input (a glob of images/PDFs/shards; repeatable) or --manifest is required")
        if not opts.output:
            raise ValueError("--output is required")
        RetryBudget.from_options(options)  # refuse an impossible --gcs_retry_* budget at launch, not on a worker
        max_tokens = {k: int(v) for k, v in parse_key_values(split_commas(opts.max_tokens), "--max_tokens").items()}
        unknown = sorted(set(max_tokens) - set(TASKS))
        if unknown:
            raise ValueError(f"--max_tokens names unknown task(s) {unknown}")
        thinking = opts.thinking == "on"
        tasks = tuple(
            with_thinking_budget(with_max_tokens(TASKS[name], max_tokens), thinking) for name in parse_task_list(opts.tasks)
        )
        profile = engine_profiles.resolve(opts.engine_profile, parse_engine_args(opts.engine_arg), checkpoint)
        profile = engine_profiles.shared_by_feeders(profile, profile.host_feeders if opts.host_feeders is None else opts.host_feeders)
        structured_output = profile.structured_output if opts.structured_output == "profile" else opts.structured_output == "on"
        vision_tokens = opts.vision_tokens or profile.vision_tokens
        engine = EngineSettings(
            model_path=model_path,
            engine_args=engine_profiles.request_engine_args(profile, vision_tokens, thinking, structured_output),
            max_in_flight=opts.max_in_flight or profile.max_in_flight,
            structured_output=structured_output,
            thinking=thinking,
            vision_tokens=vision_tokens,
            xla_cache_path=opts.xla_cache_path,
            preprocess_on_step_thread=profile.preprocess_on_step_thread,
            engine_core_process=profile.engine_core_process,
            host_feeders=profile.host_feeders,
            environment=profile.environment,
        )
        limits = DecodeLimits(
            pdf_dpi=opts.pdf_dpi,
            pages_per_unit=opts.pages_per_unit,
            max_pages=opts.max_pages,
            max_file_bytes=opts.max_file_bytes,
            max_image_pixels=opts.max_image_pixels,
            max_side=opts.max_image_side,
        )
        run = RunInfo(run_id=opts.run_id or new_run_id(), model_id=model_id, prompt_version=prompt_version(thinking))
        shards = ShardSettings(
            parquet_id_column=opts.parquet_id_column,
            parquet_bytes_column=opts.parquet_bytes_column,
            parquet_passthrough=tuple(c.strip() for c in opts.parquet_passthrough_columns.split(",") if c.strip()),
        )
        return JobConfig(
            inputs=tuple(opts.input or ()),
            manifests=split_commas(opts.manifest),
            manifest_column=opts.manifest_column,
            incremental_from=tuple(location.rstrip("/") for location in split_commas(opts.incremental_from)),
            shards=shards,
            output=opts.output.rstrip("/"),
            num_output_shards=opts.num_output_shards,
            progress_interval_s=opts.progress_interval_s,
            tasks=tasks,
            engine=engine,
            limits=limits,
            run=run,
            model_is_random=model_is_random,
        )

    def summary_fields(self) -> Mapping[str, Any]:
        return {
            "inputs": list(self.inputs),
            "manifests": list(self.manifests),
            "incremental_from": list(self.incremental_from),
            "output": self.output,
            "tasks": [t.name for t in self.tasks],
            "max_tokens": {t.name: t.max_tokens for t in self.tasks},
            "engine_args": dict(self.engine.engine_args),
            "max_in_flight": self.engine.max_in_flight,
            "host_feeders": self.engine.host_feeders,
            "vision_tokens": self.engine.vision_tokens,
            "thinking": self.engine.thinking,
            "structured_output": self.engine.structured_output,
            "decode_limits": dataclasses.asdict(self.limits),
            "shards": dataclasses.asdict(self.shards),
        }
