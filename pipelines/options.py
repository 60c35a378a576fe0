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
from transforms.builtin_tasks import BUILTIN_TASKS, DEFAULT_TASKS, select_tasks
from transforms.engine import EngineSettings
from transforms.formats import DecodeLimits
from transforms.prompts import VISION_TOKEN_BUDGETS, prompt_version
from transforms.shards import ShardSettings
from transforms.storage import RetryBudget
from transforms.task_file import load_task_file
from transforms.tasks import OutputKind, Task, with_overrides

_DEFAULT_LIMITS = DecodeLimits()
_DEFAULT_RETRY = RetryBudget()
# The image budget Gemma 4's processor uses when a request sets none and the checkpoint does not say
# (transformers Gemma4ImageProcessor max_soft_tokens default; FIELD-NOTES "Gemma 4 prompts").
GEMMA4_DEFAULT_VISION_TOKENS = 280


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
            "--tasks", default=None,
            help=f"Comma-separated tasks to run: built-in ({','.join(BUILTIN_TASKS)}) and --task_file's. "
                 f"Default: the task file's tasks, else {','.join(DEFAULT_TASKS)}.",
        )
        group.add_argument(
            "--task_file", default=None,
            help="YAML or JSON file of your own tasks (local or gs://): name, instruction with {placeholders} "
                 "filled from each item's metadata, output text|boxes|json (json with a JSON Schema), "
                 "max_tokens, sampling, vision_tokens. See README 'Your own tasks'.",
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
        group.add_argument(
            "--task_vision_tokens", dest="task_vision_tokens", action="append", default=None, metavar="TASK=N",
            help="A task's own image budget (70/140/280/560/1120), e.g. ocr=1120,caption=140; tasks without one "
                 "use --vision_tokens. Tasks of an image with different budgets do not share its prefix. Repeatable.",
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


def _task_limits(values: Optional[Sequence[str]], option: str, known: set[str]) -> dict[str, int]:
    """`TASK=N` pairs of a per-task option, for tasks that exist."""
    pairs = parse_key_values(split_commas(values), option)
    unknown = sorted(set(pairs) - known)
    if unknown:
        raise ValueError(f"{option} names unknown task(s) {unknown}; tasks are {sorted(known)}")
    try:
        return {task: int(value) for task, value in pairs.items()}
    except ValueError:
        raise ValueError(f"{option} values are whole numbers, got {values}") from None


def resolve_tasks(
    opts: "VisionBatchOptions", vision_tokens: Optional[int], checkpoint: Optional[CheckpointShape], thinking: bool
) -> tuple[tuple[Task, ...], Optional[int]]:
    """The job's tasks with their overrides, and the job's image budget.

    Tasks with their own image budget (a task file's `vision_tokens`,
    `--task_vision_tokens`) get requests with that budget; the others the
    job's (`--vision_tokens`, else the profile's). When budgets differ, the
    engine is planned for the largest, so every request carries its own:
    the job's falls back to the checkpoint's default.
    """
    file_tasks = load_task_file(opts.task_file)
    known = set(BUILTIN_TASKS) | {task.name for task in file_tasks}
    max_tokens = _task_limits(opts.max_tokens, "--max_tokens", known)
    budgets = _task_limits(opts.task_vision_tokens, "--task_vision_tokens", known)
    refused = sorted(f"{task}={n}" for task, n in budgets.items() if n not in VISION_TOKEN_BUDGETS)
    if refused:
        raise ValueError(f"--task_vision_tokens {', '.join(refused)}: budgets are {', '.join(map(str, VISION_TOKEN_BUDGETS))}")
    tasks = tuple(
        with_overrides(task, max_tokens.get(task.name), budgets.get(task.name), thinking)
        for task in select_tasks(opts.tasks, file_tasks)
    )
    if {task.vision_tokens for task in tasks if task.vision_tokens} - {vision_tokens}:
        vision_tokens = vision_tokens or (checkpoint and checkpoint.vision_tokens) or GEMMA4_DEFAULT_VISION_TOKENS
    return tuple(dataclasses.replace(task, vision_tokens=task.vision_tokens or vision_tokens) for task in tasks), vision_tokens


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
    tasks: tuple[Task, ...]
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
        thinking = opts.thinking == "on"
        profile = engine_profiles.resolve(opts.engine_profile, parse_engine_args(opts.engine_arg), checkpoint)
        structured_output = profile.structured_output if opts.structured_output == "profile" else opts.structured_output == "on"
        tasks, vision_tokens = resolve_tasks(opts, opts.vision_tokens or profile.vision_tokens, checkpoint, thinking)
        # vLLM plans memory and the encoder budget for the engine-level budget: the largest any task uses.
        largest = max([vision_tokens or 0, *(task.vision_tokens or 0 for task in tasks)]) or None
        engine = EngineSettings(
            model_path=model_path,
            engine_args=engine_profiles.request_engine_args(profile, largest, thinking, structured_output),
            max_in_flight=opts.max_in_flight or profile.max_in_flight,
            structured_output=structured_output,
            thinking=thinking,
            vision_tokens=vision_tokens,
            xla_cache_path=opts.xla_cache_path,
            preprocess_on_step_thread=profile.preprocess_on_step_thread,
            engine_core_process=profile.engine_core_process,
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
            "task_vision_tokens": {t.name: t.vision_tokens for t in self.tasks},
            # What each task asks: the report shows its output kind, instruction template and schema.
            "task_definitions": {
                t.name: {"output": t.output.value, "instruction": t.instruction, **({"schema": t.schema} if t.output is OutputKind.JSON else {})}
                for t in self.tasks
            },
            "engine_args": dict(self.engine.engine_args),
            "max_in_flight": self.engine.max_in_flight,
            "vision_tokens": self.engine.vision_tokens,
            "thinking": self.engine.thinking,
            "structured_output": self.engine.structured_output,
            "decode_limits": dataclasses.asdict(self.limits),
            "shards": dataclasses.asdict(self.shards),
        }
