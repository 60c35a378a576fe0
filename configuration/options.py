"""Pipeline options: the user-facing configuration, in one place.

Beam parses these beside its own options (runner, workers, Dataflow ...), so
one command line configures both, and Dataflow shows them in the job page.
`parse_command_line` is the strict front door of the command line: Beam's
own `PipelineOptions` drops arguments it does not know (with a warning among
the log lines), so a misspelt `--max_token` would silently run with the
default. Here every option of every registered `PipelineOptions` class,
ours and Beam's, is declared on one parser (Beam's own mechanism:
`_add_argparse_args` of each subclass, as `PipelineOptions.get_all_options`
does), and anything else is refused with a "did you mean".

Then one resolver, used alike by the command line (pipelines/vision_batch.py),
the Dataflow launch (launch/job.py, launch/run_dataflow.py) and the
benchmarks:

    options --validate--> JobRequest --plan_engine--> EnginePlan
                          (values checked once, --task_file read once)
    JobRequest + model --JobConfig.resolve--> JobConfig (typed settings of every stage)

Every mistake in them is a `UsageError`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import json
import math
import os
import sys
import uuid
from typing import Any, Callable, Iterator, Mapping, NoReturn, Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from engine import profiles as engine_profiles
from engine.api import START_TIMEOUT_S, EngineSettings
from engine.checkpoint_shape import CheckpointShape, dtype_bytes
from engine.prompts import THINKING_BUDGET, VISION_TOKEN_BUDGETS, prompt_token_bound, prompt_version
from library import storage
from library.formats import DecodeLimits
from library.shards import ShardSettings
from schemas.records import RunInfo
from schemas.uris import canonical_uri, is_uri
from tasks.builtin import BUILTIN_TASKS, DEFAULT_TASKS, PAGE_TASKS, select_tasks
from tasks.kinds import KINDS
from tasks.task import Task, with_overrides
from tasks.task_file import load_task_file
from tasks.text_layer import DEFAULT_MODE as TEXT_LAYER_DEFAULT, MODES as TEXT_LAYER_MODES, TextLayerSettings
from tiny_model.checkpoint import DEFAULT_PRESET, PRESETS
from transforms.sources import InputSelection, ManifestError, is_glob, manifest_entries
from transforms.summary import SummaryConfig

PROG = "vision_batch"
_DEFAULT_LIMITS = DecodeLimits()
# The image budget Gemma 4's processor uses when a request sets none and the checkpoint does not say
# (huggingface/transformers src/transformers/models/gemma4/image_processing_gemma4.py: Gemma4ImageProcessor.max_soft_tokens).
GEMMA4_DEFAULT_VISION_TOKENS = 280
# A few corrupt inputs per hundred are normal in a nightly feed; more usually means a systematic
# problem (a wrong glob, a misconfigured model or engine) that a scheduler should alert on.
DEFAULT_MAX_ERROR_FRACTION = 0.05
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class UsageError(ValueError):
    """A mistake in how the job was asked for: reported as one line, exit code 2, no traceback."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """ValueErrors of the settings' own checks (task file, engine profile, retry budget) as UsageErrors."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as exc:  # TaskFileError, CheckpointRefused, ... : the message already names the option
        raise UsageError(str(exc)) from exc


def parse_bool(text: str) -> bool:
    """Flag values for flex templates, which pass every parameter as `--name=value`."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_flag(group: Any, name: str, help_text: str) -> None:
    """`--name` alone means true; `--name=false` is accepted too (flex template parameters)."""
    group.add_argument(name, type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL", help=help_text)


class VisionBatchOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        inputs = parser.add_argument_group("inputs")
        inputs.add_argument(
            "--input", dest="input", action="append",
            help="Files to read: a folder (its files, recursively), a glob (*, **, ?, [...]) or one file; local "
                 "or gs://. Quote globs so the shell does not expand them. Repeatable.",
        )
        inputs.add_argument(
            "--manifest", dest="manifest", action="append", default=None,
            help="File listing inputs, one URI per entry: text (one per line), CSV or Parquet "
                 "(column --manifest_column; a row's other columns become the item's metadata). Relative "
                 "entries are relative to the manifest. Repeatable, or comma-separated (a value naming an existing "
                 "local file is that one file, commas and all).",
        )
        inputs.add_argument("--manifest_column", default="uri", help="Column of CSV/Parquet manifests holding the URIs.")
        inputs.add_argument(
            "--include", dest="include", action="append", default=None, metavar="PATTERN",
            help="Keep only files of folders and globs matching a pattern: a file name pattern (*.pdf) or, with "
                 "a '/', a path relative to the folder or the glob's fixed part (2026/*/*.png). Repeatable or "
                 "comma-separated. Default: every file.",
        )
        inputs.add_argument(
            "--exclude", dest="exclude", action="append", default=None, metavar="PATTERN",
            help="Drop files of folders and globs matching a pattern (same forms as --include), e.g. '*.txt'. "
                 "Repeatable or comma-separated.",
        )
        _add_flag(
            inputs, "--include_hidden",
            "Also read hidden files and folders (names starting with '.', e.g. .DS_Store, .git/) of folders and globs.",
        )
        inputs.add_argument(
            "--limit", type=int, default=None, metavar="N",
            help="Process at most N items (images or pages), the first in input order: for a trial run. "
                 "Default: all.",
        )
        inputs.add_argument(
            "--incremental_from", dest="incremental_from", action="append", default=None,
            help="Earlier output location; (content, task, model, prompt version, task fingerprint) pairs its "
                 "complete runs already answered are skipped. Globs allowed (e.g. gs://b/nightly/*); --output "
                 "itself is never read. Repeatable, or comma-separated. A location without a complete run is a warning.",
        )
        inputs.add_argument(
            "--parquet_id_column", default=ShardSettings.parquet_id_column,
            help="Parquet shards: column naming each row (the row number when absent).",
        )
        inputs.add_argument(
            "--parquet_bytes_column", default=ShardSettings.parquet_bytes_column,
            help="Parquet shards: column holding the image/PDF bytes (binary, or a struct with a 'bytes' field).",
        )
        inputs.add_argument(
            "--parquet_passthrough_columns", default="",
            help="Parquet shards: comma-separated columns copied into each row's metadata JSON.",
        )

        outputs = parser.add_argument_group("outputs and outcome")
        outputs.add_argument(
            "--output",
            help="Output folder (local or gs://): results/, errors/ and run_summary.json go under it. Must be new "
                 "or empty, or hold an unfinished run of this pipeline (its leftovers are removed); files it did not "
                 "write are never deleted, and one run at a time writes to it. Required.",
        )
        _add_flag(
            outputs, "--replace_output",
            "Delete the finished run already in --output before writing (without it such an --output is refused).",
        )
        outputs.add_argument(
            "--max_error_fraction", type=float, default=DEFAULT_MAX_ERROR_FRACTION, metavar="F",
            help="Error budget: the run fails (exit code 1, state FAILED) when more than this fraction of its task "
                 "outcomes are errors (an item that fails before the engine counts for all its tasks).",
        )
        _add_flag(
            outputs, "--count_flagged_as_errors",
            "Count results still degenerate after their retry ladder (quality_flags truncated, looped or empty) "
            "against --max_error_fraction, as if they were errors. Off by default: they are answers, kept and "
            "flagged (a page cut at max_tokens keeps most of its text); run_summary.json counts them either way.",
        )
        outputs.add_argument(
            "--num_output_shards", type=int, default=0,
            help="Files per output table; 0 lets the runner write one per bundle. Set it for large runs "
                 "whose downstream readers prefer a fixed file count (aim for 100 MB - 1 GB per file).",
        )
        outputs.add_argument("--run_id", default=None, help="Run identifier written to every row. Default: UTC time + random suffix.")
        outputs.add_argument(
            "--log_level", default=None, choices=LOG_LEVELS,
            help="Log everything at this level (Beam, vLLM, ...). Default: this pipeline's own lines only, "
                 "vLLM's warnings minus known harmless ones (local runs; Dataflow keeps its full logs).",
        )
        outputs.add_argument(
            "--progress_interval_s", type=float, default=30.0,
            help="Seconds between progress lines per worker process, the first after a few seconds (0: none).",
        )

        model = parser.add_argument_group("tasks and model")
        model.add_argument(
            "--tasks", default=None,
            help=f"Comma-separated tasks to run: built-in ({', '.join(BUILTIN_TASKS)}) and --task_file's. "
                 f"Default: the task file's tasks, else {','.join(DEFAULT_TASKS)}.",
        )
        model.add_argument(
            "--task_file", default=None,
            help="YAML or JSON file of your own tasks (local or gs://): name, instruction with {placeholders} "
                 f"filled from each item's metadata, output {'|'.join(KINDS)} (json with a JSON Schema), "
                 "max_tokens, sampling, vision_tokens. See README 'Your own tasks'.",
        )
        model.add_argument(
            "--max_tokens", dest="max_tokens", action="append", default=None, metavar="TASK=N",
            help="Override a task's output token limit, e.g. ocr=512 (or ocr=512,caption=64). Repeatable. Default: "
                 + ", ".join(f"{name} {task.max_tokens}" for name, task in BUILTIN_TASKS.items())
                 + "; a task file's own (512 when it gives none).",
        )
        model.add_argument(
            "--max_retries", type=int, default=None, metavar="N",
            help="Re-ask an answer at most N times along its task's retry ladder (a failed parse or schema check, "
                 "or a degenerate prose answer: truncated, looping, empty). Default: the whole ladder (2 rungs for "
                 "the built-in tasks). 0 keeps every first answer, flagged; each re-ask reuses the image's cached "
                 "prefix, so it costs the answer's tokens, not the image's.",
        )
        model.add_argument(
            "--task_vision_tokens", dest="task_vision_tokens", action="append", default=None, metavar="TASK=N",
            help="A task's own image budget (70/140/280/560/1120), e.g. ocr=1120,caption=140; tasks without one "
                 "use --vision_tokens. Tasks of an image with different budgets do not share its prefix. Repeatable.",
        )
        model.add_argument(
            "--thinking", default="off", choices=["off", "on"],
            help="Gemma 4 thinking mode: the model reasons before answering; the thought goes to the results' "
                 "thought column and each task gets extra output tokens for it. Slower and costlier.",
        )
        model.add_argument(
            "--text_layer", default=TEXT_LAYER_DEFAULT, choices=TEXT_LAYER_MODES,
            help="PDF pages' own text layer, read before rendering and judged per page (results' "
                 "text_layer_verdict): model: every page goes to the model; auto: ocr answers for trusted "
                 "pages come from the layer (no engine request, no rendering), other pages go to the model; "
                 "anchor: as auto, and the layer's text goes into the prompt of ocr on partial pages and of "
                 "markdown. See README 'Born-digital PDFs'.",
        )
        model.add_argument(
            "--text_layer_check", type=float, default=0.0, metavar="F",
            help="Fraction of the pages the text layer would answer that the model reads instead, as an audit: "
                 "their rows carry text_layer_cer, the model's CER against the layer. 0: none.",
        )
        model.add_argument(
            "--model", default=None,
            help="Hugging Face-format Gemma 4 checkpoint: local directory or gs:// prefix. Default: the project's "
                 "tiny random-weight checkpoint (outputs are random; for tests and demos only).",
        )
        model.add_argument(
            "--model_id", default=None,
            help="Model name written to every row and used in incremental-run keys. Default: --model as given.",
        )
        model.add_argument(
            "--tiny_preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
            help="Which tiny random-weight checkpoint the default model uses: one per Gemma 4 architecture "
                 "(tiny_model/checkpoint.py).",
        )

        engine = parser.add_argument_group("engine")
        engine.add_argument(
            "--engine_profile", default="cpu-tiny", choices=sorted(engine_profiles.PROFILES),
            help="Named vLLM engine profile (see engine/profiles.py).",
        )
        engine.add_argument(
            "--engine_arg", dest="engine_arg", action="append", default=None, metavar="KEY=VALUE",
            help="Override one vLLM engine argument of the profile; VALUE is JSON or a plain string. Repeatable.",
        )
        engine.add_argument(
            "--structured_output", default="profile", choices=["profile", "on", "off"],
            help="Constrain answers of every output kind but text to their JSON Schema: the profile's choice "
                 "(TPU: off), or force it.",
        )
        engine.add_argument(
            "--xla_cache_path", default=None,
            help="Persistent XLA compile cache (local or gs:// directory), exported to each worker's engine as "
                 "VLLM_XLA_CACHE_PATH. TPU: saves a ~30-minute compile per worker once filled (launch/ sets it).",
        )
        _add_flag(
            engine, "--xla_cache_required",
            "Fail the engine start when this worker cannot write --xla_cache_path (checked first, before the "
            "compile) or when it holds no compiled program after it (the warm-up job sets it: a warm-up that saved "
            "nothing must not succeed).",
        )
        engine.add_argument(
            "--engine_start_timeout_s", type=float, default=START_TIMEOUT_S, metavar="S",
            help="Seconds an engine may take to become ready (model load, KV cache, XLA compile; not the checkpoint "
                 "copy) before its start fails, naming what it waited for. The default covers a cold ~30-minute TPU "
                 "compile with room to spare; lower it to fail a stuck start sooner.",
        )
        engine.add_argument(
            "--max_in_flight", type=int, default=None,
            help="Requests admitted to the engine per worker process (back-pressure). Default: the profile's.",
        )
        engine.add_argument(
            "--host_feeders", type=int, default=None, metavar="N",
            help="Worker processes of one host that feed one shared engine core (1: an engine per process). The "
                 "profile's in-flight limit is shared by the processes attached, its image cache split between them. "
                 "Unverified on Dataflow: every profile runs 1 until it has been measured on a TPU VM, and a "
                 "worker whose SDK processes do not share one container stops at engine start. Default: the profile's.",
        )
        engine.add_argument(
            "--vision_tokens", type=int, default=None, choices=VISION_TOKEN_BUDGETS,
            help="Image soft-token budget per request (Gemma 4: 70/140/280/560/1120). Default: the profile's, "
                 "else the checkpoint's.",
        )

        decoding = parser.add_argument_group("decoding limits")
        decoding.add_argument("--pdf_dpi", type=float, default=_DEFAULT_LIMITS.pdf_dpi, help="PDF render resolution.")
        decoding.add_argument(
            "--pages_per_unit", type=int, default=_DEFAULT_LIMITS.pages_per_unit,
            help="Pages of one document decoded together before fanning out.",
        )
        decoding.add_argument("--max_pages", type=int, default=_DEFAULT_LIMITS.max_pages, help="Documents with more pages become an error row.")
        decoding.add_argument("--max_file_bytes", type=int, default=_DEFAULT_LIMITS.max_file_bytes, help="Larger files become an error row.")
        decoding.add_argument(
            "--max_image_pixels", type=int, default=_DEFAULT_LIMITS.max_image_pixels,
            help="Images/pages with more pixels become an error row (decompression-bomb guard).",
        )
        decoding.add_argument(
            "--max_image_side", type=int, default=_DEFAULT_LIMITS.max_side,
            help="Images are downscaled to this longest side before the engine.",
        )
        # Page checks of PDF pages and scans (library/page_checks.py; photos are never checked).
        decoding.add_argument(
            "--skip_blank_pages", default="on", choices=["on", "off"],
            help="A blank page (no ink: not even a page number or a faint stamp) gets an empty answer flagged "
                 "'blank' without an engine request.",
        )
        decoding.add_argument(
            "--upright_pages", default="on", choices=["on", "off"],
            help="Turn sideways and upside-down pages upright (Tesseract's OSD, on the host CPU) before the "
                 "model sees them; the turn goes to the 'rotation' column, boxes are mapped back to source pixels.",
        )

        # Retry budget of every GCS request, in every worker: library/storage.py declares and reads it.
        storage.add_retry_arguments(parser.add_argument_group("storage retries (gs://)"))


def split_commas(values: Optional[Sequence[str]]) -> tuple[str, ...]:
    """Repeated options may also hold comma-separated lists: a flex-template parameter takes one value."""
    return tuple(part.strip() for value in values or () for part in value.split(",") if part.strip())


def split_manifests(values: Optional[Sequence[str]]) -> tuple[str, ...]:
    """`split_commas` for manifests, except that a value naming an existing local file is one location:
    `--manifest "orders, march.csv"` is that file, not `orders` and `march.csv`."""
    return tuple(
        location
        for value in values or ()
        for location in ((value,) if not is_uri(value) and os.path.exists(os.path.expanduser(value)) else split_commas([value]))
    )


def parse_key_values(pairs: Optional[Sequence[str]], what: str) -> dict[str, str]:
    result = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} must look like KEY=VALUE, got {pair!r}")
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


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    hint = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {hint[0]}?" if hint else ""


def _check_task_names(option: str, shown: str, names: Sequence[str], known: Sequence[str]) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(
            f"{option} {shown}: unknown task {unknown[0]!r}; choose from {', '.join(known)}"
            + _did_you_mean(unknown[0], known)
        )


def _task_limits(
    values: Optional[Sequence[str]], option: str, known: Sequence[str], meaning: str, most: Optional[int] = None
) -> dict[str, int]:
    """`TASK=N` pairs of a per-task option, for tasks that exist, N a positive whole number (at most `most`)."""
    pairs = parse_key_values(split_commas(values), option)
    _check_task_names(option, ",".join(f"{task}={n}" for task, n in pairs.items()), list(pairs), known)
    for task, count in pairs.items():
        if not count.isdigit() or int(count) < 1 or (most is not None and int(count) > most):
            raise UsageError(f"{option} {task}={count}: N must be {meaning}")
    return {task: int(count) for task, count in pairs.items()}


def _tasks(opts: "VisionBatchOptions", thinking: bool) -> tuple[Task, ...]:
    """The job's tasks with their own overrides (--max_tokens, --task_vision_tokens, --thinking); UsageError for a mistake.

    The one place --task_file is read and task names are checked.
    """
    with usage_errors():
        file_tasks = load_task_file(opts.task_file, engine_profiles.LARGEST_CONTEXT)
    known = [*BUILTIN_TASKS, *(task.name for task in file_tasks)]  # a task file cannot redefine a built-in
    if opts.tasks is not None:
        names = [name.strip() for name in opts.tasks.split(",") if name.strip()]
        if not names:
            raise UsageError(f"--tasks {opts.tasks!r}: no task given; choose from {', '.join(known)}")
        _check_task_names("--tasks", opts.tasks, names, known)
    max_tokens = _task_limits(
        opts.max_tokens, "--max_tokens", known,
        f"a whole number of tokens, at least 1 and at most {engine_profiles.LARGEST_CONTEXT} (the longest context "
        f"of any engine profile)", engine_profiles.LARGEST_CONTEXT,
    )
    budgets = _task_limits(opts.task_vision_tokens, "--task_vision_tokens", known, "a whole number of soft tokens")
    refused = sorted(f"{task}={n}" for task, n in budgets.items() if n not in VISION_TOKEN_BUDGETS)
    if refused:
        raise UsageError(f"--task_vision_tokens {', '.join(refused)}: budgets are {', '.join(map(str, VISION_TOKEN_BUDGETS))}")
    selected = select_tasks(opts.tasks, file_tasks)
    # An image budget for a task the run does not run changes nothing: a sign the run is not the one meant.
    # (--max_tokens may name such tasks: one set of limits serves several runs, e.g. a scheduler's template.)
    idle = sorted(f"{task}={n}" for task, n in budgets.items() if task not in {t.name for t in selected})
    if idle:
        raise UsageError(
            f"--task_vision_tokens {', '.join(idle)}: not among the tasks this run runs "
            f"({', '.join(t.name for t in selected)}); add the task to --tasks or drop its budget"
        )
    return tuple(with_overrides(task, max_tokens.get(task.name), budgets.get(task.name), thinking) for task in selected)


def _with_job_budget(
    tasks: Sequence[Task], vision_tokens: Optional[int], checkpoint: Optional[CheckpointShape]
) -> tuple[tuple[Task, ...], Optional[int]]:
    """Every task with the image budget its requests carry, and the job's budget.

    Tasks with their own image budget (a task file's `vision_tokens`,
    `--task_vision_tokens`) keep it; the others get the job's
    (`--vision_tokens`, else the profile's). When budgets differ, the
    engine is planned for the largest, so every request carries its own:
    the job's falls back to the checkpoint's default.
    """
    if {task.vision_tokens for task in tasks if task.vision_tokens} - {vision_tokens}:
        vision_tokens = vision_tokens or (checkpoint and checkpoint.vision_tokens) or GEMMA4_DEFAULT_VISION_TOKENS
    return tuple(dataclasses.replace(task, vision_tokens=task.vision_tokens or vision_tokens) for task in tasks), vision_tokens


# Range checks of single values: (option, test, what it must be). Run at parse time, before anything starts.
_VALUE_CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("limit", lambda v: v >= 1, "a whole number of items, at least 1"),
    ("max_error_fraction", lambda v: 0.0 <= v <= 1.0, "a fraction between 0 and 1 (0: no error tolerated)"),
    ("text_layer_check", lambda v: 0.0 <= v <= 1.0, "a fraction between 0 and 1 (0: no audit sample)"),
    ("num_output_shards", lambda v: v >= 0, "0 (runner decides) or a positive number of files"),
    ("progress_interval_s", lambda v: v >= 0 and math.isfinite(v), "seconds, 0 or more (0: no progress lines)"),
    ("max_in_flight", lambda v: v >= 1, "at least 1"),
    ("max_retries", lambda v: v >= 0, "0 or more"),
    ("host_feeders", lambda v: v >= 1, "at least 1 (1: an engine per worker process)"),
    ("engine_start_timeout_s", lambda v: v > 0 and math.isfinite(v), "seconds, more than 0"),
    ("pdf_dpi", lambda v: 0 < v <= 1200 and math.isfinite(v), "a resolution above 0 and at most 1200"),
    ("pages_per_unit", lambda v: v >= 1, "at least 1"),
    ("max_pages", lambda v: v >= 1, "at least 1"),
    ("max_file_bytes", lambda v: v >= 1, "a positive number of bytes"),
    ("max_image_pixels", lambda v: v >= 1, "a positive number of pixels"),
    ("max_image_side", lambda v: v >= 16, "at least 16 pixels"),
    ("gcs_retry_timeout_s", lambda v: 0 < v and math.isfinite(v), "seconds, above 0"),
    ("gcs_retry_initial_delay_s", lambda v: 0 < v and math.isfinite(v), "seconds, above 0"),
    ("gcs_retry_max_delay_s", lambda v: 0 < v and math.isfinite(v), "seconds, above 0 and at least --gcs_retry_initial_delay_s"),
)


def check_values(options: PipelineOptions) -> None:
    """The checks that read nothing: single values, combinations and required options. Raises UsageError."""
    opts = options.view_as(VisionBatchOptions)
    for name, test, meaning in _VALUE_CHECKS:
        value = getattr(opts, name)
        if value is not None and not test(value):
            raise UsageError(f"--{name} {value}: must be {meaning}")
    if not opts.input and not opts.manifest:
        raise UsageError("--input (a folder, glob or file; repeatable) or --manifest is required")
    if not opts.output:
        raise UsageError("--output (a new or empty folder, local or gs://) is required")
    with usage_errors():
        storage.RetryBudget.from_options(options)  # the combination of the --gcs_retry_* values


def _local(path: str) -> Optional[str]:
    """The local file-system path of an option's value; None for an object-store URI (the run finds those out)."""
    return None if is_uri(path) else os.path.expanduser(path)


def _missing_local_paths(opts: "VisionBatchOptions", manifests: Sequence[str]) -> list[str]:
    """Local --input files and folders (globs aside), manifests and task files that do not exist.

    Caught before the engine starts; a glob that matches nothing stays an
    error row of the run ("no file matched"): a nightly feed's empty folder is
    no usage mistake. Object-store locations are found out by the run itself.
    """
    named = [
        *(("--input", path) for path in opts.input or () if not is_glob(path)),
        *(("--manifest", path) for path in manifests),
        *([("--task_file", opts.task_file)] if opts.task_file else []),
    ]
    return [f"{option} {path} does not exist" for option, path in named
            if _local(path) is not None and not os.path.exists(_local(path))]


def _manifest_mistakes(opts: "VisionBatchOptions", manifests: Sequence[str]) -> list[str]:
    """What is wrong with each local manifest: a folder given as one, a CSV or Parquet header (read now, not after the engine started)."""
    mistakes = []
    for path in manifests:
        local = _local(path)
        if local is not None and os.path.isdir(local):
            mistakes.append(f"--manifest {path} is a folder: a manifest is a file listing inputs (give a folder as --input)")
        elif local is not None and os.path.isfile(local):
            try:
                next(manifest_entries(canonical_uri(path), opts.manifest_column), None)
            except ManifestError as exc:
                mistakes.append(f"--manifest {path}: {exc}")
    return mistakes


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """A job's options with every value checked and --task_file read: what it asks for, before the model is known.

    Made once per launch (`validate`) and passed on: the engine plan and the
    job's configuration are resolved from it without checking or reading again.
    """

    options: PipelineOptions
    engine_args: Mapping[str, Any]  # --engine_arg, parsed
    tasks: tuple[Task, ...]  # selected, each with its own overrides; the job's image budget is the engine plan's
    thinking: bool

    @property
    def opts(self) -> "VisionBatchOptions":
        return self.options.view_as(VisionBatchOptions)


def validate(options: PipelineOptions, local_paths: bool = True) -> JobRequest:
    """Every check before the model is looked at, each once: `check_values`, --engine_arg (parsed), the local paths
    named, then the tasks (reading --task_file).

    `local_paths=False` for options whose inputs only other machines read
    (a Dataflow job's launcher VM; tests of the settings alone).
    """
    check_values(options)
    opts = options.view_as(VisionBatchOptions)
    engine_args = parse_engine_args(opts.engine_arg)
    # Before the first read (manifests, the task file, then the run's own): Beam's GCS client then retries
    # with the job's --gcs_retry_* budget and names what failed (library/storage.py). Workers install it
    # through --beam_plugins (storage.add_worker_plugin).
    storage.install()
    if local_paths:
        manifests = split_manifests(opts.manifest)
        mistakes = _missing_local_paths(opts, manifests) + _manifest_mistakes(opts, manifests)
        if mistakes:
            raise UsageError("; ".join(mistakes))
    thinking = opts.thinking == "on"
    return JobRequest(options, engine_args, _tasks(opts, thinking), thinking)


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    """The engine a job's worker processes run, planned once from its request (`plan_engine`)."""

    profile: engine_profiles.EngineProfile  # --engine_arg applied, fitted, split between feeders; vision_tokens: the job's
    tasks: tuple[Task, ...]  # each with the image budget its requests carry
    max_in_flight: int
    structured_output: bool
    thinking: bool
    xla_cache_path: Optional[str]
    xla_cache_required: bool = False
    start_timeout_s: float = START_TIMEOUT_S

    @property
    def largest_vision_tokens(self) -> Optional[int]:
        """vLLM plans memory and the encoder budget for the engine-level budget: the largest any request carries."""
        return max([self.profile.vision_tokens or 0, *(task.vision_tokens or 0 for task in self.tasks)]) or None

    def describe(self) -> list[str]:
        """The resolved engine, in the words an operator checks before paying for a job (launch.submit --dry-run)."""
        args = engine_profiles.request_engine_args(self.profile, self.largest_vision_tokens, self.thinking, self.structured_output)
        needed, why = context_needed(self.tasks)
        budgets = ", ".join(f"{task.name} {task.vision_tokens or 'the checkpoint default'}" for task in self.tasks)
        return [
            f"engine profile {self.profile.name}: max_model_len {args['max_model_len']} (needed {needed}: {why}"
            + (", thinking's budget included)" if self.thinking else ")"),
            f"image budgets: {budgets}; the engine is planned for {self.largest_vision_tokens or 'the checkpoint default'}",
            f"host_feeders {self.profile.host_feeders}; max_in_flight {self.max_in_flight} per worker process; "
            f"structured output {'on' if self.structured_output else 'off'}; thinking {'on' if self.thinking else 'off'}",
            f"engine_args {json.dumps(args, sort_keys=True, default=str)}",
        ]

    def settings(self, model_path: str) -> EngineSettings:
        profile = self.profile
        return EngineSettings(
            model_path=model_path,
            engine_args=engine_profiles.request_engine_args(
                profile, self.largest_vision_tokens, self.thinking, self.structured_output
            ),
            max_in_flight=self.max_in_flight,
            structured_output=self.structured_output,
            thinking=self.thinking,
            vision_tokens=profile.vision_tokens,
            xla_cache_path=self.xla_cache_path,
            xla_cache_required=self.xla_cache_required,
            start_timeout_s=self.start_timeout_s,
            preprocess_on_step_thread=profile.preprocess_on_step_thread,
            engine_core_process=profile.engine_core_process,
            host_feeders=profile.host_feeders,
            environment=profile.environment,
        )


def plan_engine(
    request: JobRequest, checkpoint: Optional[CheckpointShape] = None, feeders: Callable[[int], int] = lambda wanted: wanted
) -> EnginePlan:
    """The engine for `request`: the one construction, for the job (`JobConfig.resolve`) and its launcher (launch/job.py).

    `checkpoint`: the model's shape, when known, so the profile checks and
    fits it (a launcher knows only a gs:// location). `feeders`: how many
    processes feed one engine core, given how many the options (else the
    profile) want; the launcher fits it to the worker's SDK processes.
    Raises UsageError naming the option, profile or checkpoint refused.
    """
    opts = request.opts
    planned = engine_profiles.PROFILES[opts.engine_profile]
    page_budget = None if opts.vision_tokens else planned.page_vision_tokens  # a job's own budget holds for every task
    tasks = tuple(
        dataclasses.replace(task, vision_tokens=page_budget)
        if page_budget and task.name in PAGE_TASKS and not task.vision_tokens else task
        for task in request.tasks
    )
    tasks, vision_tokens = _with_job_budget(tasks, opts.vision_tokens or planned.vision_tokens, checkpoint)
    engine_args = _with_context_length(request, tasks, checkpoint)
    with usage_errors():
        profile = engine_profiles.resolve(opts.engine_profile, engine_args, checkpoint)
        wanted = profile.host_feeders if opts.host_feeders is None else opts.host_feeders
        profile = engine_profiles.shared_by_feeders(profile, feeders(wanted))
    _check_kv_pool(profile, checkpoint)
    return EnginePlan(
        profile=dataclasses.replace(profile, vision_tokens=vision_tokens),
        tasks=tasks,
        max_in_flight=opts.max_in_flight or profile.max_in_flight,
        structured_output=profile.structured_output if opts.structured_output == "profile" else opts.structured_output == "on",
        thinking=request.thinking,
        xla_cache_path=opts.xla_cache_path,
        xla_cache_required=opts.xla_cache_required,
        start_timeout_s=opts.engine_start_timeout_s,
    )


# The engine's context length is planned in whole steps of this many tokens (fewer distinct lengths
# to compile on TPU; the profiles' own values are multiples of it).
CONTEXT_STEP = 1024


def context_needed(tasks: Sequence[Task], checkpoint: Optional[CheckpointShape] = None) -> tuple[int, str]:
    """(tokens, why): the longest prompt of the job's tasks (system + image budget + instruction, bounded
    without the tokenizer: `prompt_token_bound`) plus the largest `max_tokens` (thinking's budget included)."""
    default_budget = (checkpoint and checkpoint.vision_tokens) or GEMMA4_DEFAULT_VISION_TOKENS
    prompts = {task.name: prompt_token_bound(task.instruction, task.vision_tokens or default_budget) for task in tasks}
    longest_prompt = max(prompts, key=prompts.__getitem__)
    longest_answer = max(tasks, key=lambda task: task.max_tokens)
    why = (f"the longest prompt, {longest_prompt}'s (at most {prompts[longest_prompt]} tokens with its image), plus the "
           f"largest max_tokens, {longest_answer.name}'s {longest_answer.max_tokens}")
    return prompts[longest_prompt] + longest_answer.max_tokens, why


def _with_context_length(request: JobRequest, tasks: Sequence[Task], checkpoint: Optional[CheckpointShape]) -> dict[str, Any]:
    """The job's engine-argument overrides with a `max_model_len` that holds its longest request.

    The profile's value when it is long enough; else raised to the next CONTEXT_STEP; a length the
    user set (`--engine_arg max_model_len=N`) that is too short is refused, naming the options.
    vLLM would otherwise stop each long answer at the length limit and keep it as an ordinary row.
    """
    needed, why = context_needed(tasks, checkpoint)
    needed_why = why + (f" (thinking's {THINKING_BUDGET} included)" if request.thinking else "")
    given = request.engine_args.get("max_model_len")
    if given is not None:
        if not isinstance(given, int) or given < needed:
            raise UsageError(
                f"--engine_arg max_model_len={given}: this job needs up to {needed} tokens per request: {needed_why}. "
                f"Raise max_model_len to at least {needed}, or lower --max_tokens TASK=N or the image budget "
                "(--vision_tokens, --task_vision_tokens)"
            )
        return dict(request.engine_args)
    planned = engine_profiles.PROFILES[request.opts.engine_profile].engine_args["max_model_len"]
    if planned >= needed:
        return dict(request.engine_args)
    return {**request.engine_args, "max_model_len": -(-needed // CONTEXT_STEP) * CONTEXT_STEP}


def _check_kv_pool(profile: engine_profiles.EngineProfile, checkpoint: Optional[CheckpointShape]) -> None:
    """A fixed KV pool (cpu-tiny) must hold one sequence of the planned length, or vLLM refuses at start."""
    args = profile.engine_args
    pool = args.get("kv_cache_memory_bytes")
    if checkpoint is None or not pool:
        return
    length = args["max_model_len"]
    one = checkpoint.kv_bytes_per_sequence(
        length, dtype_bytes(args.get("dtype")), windowed=not args.get("disable_hybrid_kv_cache_manager", False)
    )
    if one > pool:
        raise UsageError(
            f"engine profile {profile.name}: one {length}-token sequence of this checkpoint needs {one / 2**20:.0f} MiB of "
            f"KV, its pool holds {pool / 2**20:.0f} MiB; lower --max_tokens TASK=N, or raise the pool "
            f"(--engine_arg kv_cache_memory_bytes={one} at least)"
        )


class _StrictParser(_BeamArgumentParser):
    """Beam's parser, reporting mistakes as UsageError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Every option with its default, unless the help text already says what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "Default" in text or "Required" in text or default is argparse.SUPPRESS:
            return text
        if default is None or default == "":
            return f"{text} (default: none)"
        if default is False:
            return f"{text} (default: off)"
        return f"{text} (default: {default})"


def _beam_option_classes() -> list[type[PipelineOptions]]:
    """Beam's registered option classes, deduplicated as `PipelineOptions.get_all_options` does."""
    unique: dict[str, type[PipelineOptions]] = {}
    for cls in PipelineOptions.__subclasses__():
        if cls is not VisionBatchOptions:
            unique.setdefault(str(cls), cls)
    return list(unique.values())


class _BeamHelp(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        build_parser(show_beam=True).print_help()
        parser.exit()


def build_parser(show_beam: bool = False) -> _StrictParser:
    """Every option the command line accepts; `--help` shows ours, `--help_beam` Beam's as well."""
    parser = _StrictParser(
        prog=PROG,
        usage="%(prog)s --input FILES [--input ...] --output FOLDER [options] [Beam options]",
        description="Batch OCR, captions, detection, markdown and your own tasks with Gemma 4 on vLLM, "
                    "as an Apache Beam pipeline.",
        epilog="Beam's own options (--runner, --direct_num_workers, Dataflow's --project/--region/..., ...) are "
               "accepted too: --help_beam lists them. Exit codes: 0 succeeded, 1 failed (error budget exceeded, "
               "nothing processed, or the run broke), 2 usage error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # as Beam: a prefix of an option is a mistake, not that option
    )
    parser.add_argument("--help_beam", action=_BeamHelp, help="Show Beam's own options as well, and exit.")
    VisionBatchOptions._add_argparse_args(parser)
    ours = set(map(id, parser._actions))
    for cls in _beam_option_classes():
        cls._add_argparse_args(parser)  # Beam's hook for declaring options; called as Beam does
    if not show_beam:
        for action in parser._actions:
            if id(action) not in ours:
                action.help = argparse.SUPPRESS
    return parser


_GLOB_OPTIONS = ("--input", "--manifest", "--incremental_from", "--include", "--exclude")


def _unknown_message(unknown: Sequence[str], argv: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """One line naming what nobody declares, with the likely intended option or the shell's glob expansion."""
    known = [flag for action in parser._actions for flag in action.option_strings]
    problems: list[str] = []
    strays: dict[str, list[str]] = {}  # option before them -> values it cannot take
    for position, arg in enumerate(argv):
        if arg not in unknown:
            continue
        name = arg.split("=", 1)[0]
        if name.startswith("--"):
            underscored = name.replace("-", "_")
            if underscored in known:
                problems.append(f"unknown option {name}; did you mean {underscored}? (options use underscores)")
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
            problems.append(f"unknown option {name}" + (f"; did you mean {close[0]}?" if close else ""))
        elif name.startswith("-") and len(name) > 1:
            problems.append(f"unknown option {name}; options are spelled with two dashes (--input)")
        elif position > 0 and argv[position - 1] in unknown and argv[position - 1].startswith("-"):
            continue  # the value of an unknown option, reported with it
        else:
            before = next((a.split("=", 1)[0] for a in reversed(argv[:position]) if a.startswith("--")), "")
            strays.setdefault(before, []).append(arg)
    for option, values in strays.items():
        listed = ", ".join(repr(v) for v in values[:3]) + (f" and {len(values) - 3} more" if len(values) > 3 else "")
        if option in _GLOB_OPTIONS:
            problems.append(
                f"unexpected arguments {listed} after {option}: the shell expanded an unquoted glob; "
                f"quote it so the pipeline sees the pattern, e.g. {option} 'data/*.png'"
            )
        else:
            problems.append(f"unexpected argument(s) {listed}" + (f" after {option}" if option else "")
                            + ": each option takes one value (repeat the option for more)")
    return "; ".join(problems) + " (see --help)"


def parse_command_line(argv: Optional[Sequence[str]] = None) -> PipelineOptions:
    """The command line as PipelineOptions, its options and values checked, nothing read yet (see `parse_args`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UsageError(_unknown_message(unknown, argv, parser))
    return PipelineOptions(argv)


def parse_args(argv: Optional[Sequence[str]] = None) -> PipelineOptions:
    """The command line as PipelineOptions, or UsageError naming the first mistake: for callers that only check it.

    `--help` and `--help_beam` print and exit (SystemExit 0), as argparse does.
    """
    options = parse_command_line(argv)
    validate(options)
    return options


def new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Typed settings for every stage, resolved once at launch."""

    inputs: tuple[str, ...]
    manifests: tuple[str, ...]
    manifest_column: str
    selection: InputSelection
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
    max_error_fraction: float = DEFAULT_MAX_ERROR_FRACTION
    text_layer: TextLayerSettings = TextLayerSettings()  # --text_layer, --text_layer_check
    count_flagged_as_errors: bool = False  # degenerate results count against the error budget
    max_retries: Optional[int] = None  # --max_retries: re-asks per answer at most; None: each task's whole ladder
    # The summary step raises when the run failed, so the job itself ends failed (Dataflow, flex
    # templates: what Cloud Scheduler and Composer see). A caller that waits and reports the
    # outcome itself (a local run through pipelines.vision_batch) turns it off.
    fail_job_on_failure: bool = True
    warnings: tuple[str, ...] = ()  # found at launch (e.g. an --incremental_from with no results); in the summary

    @staticmethod
    def resolve(
        request: JobRequest, model_path: str, model_id: str, model_is_random: bool,
        checkpoint: Optional[CheckpointShape] = None,
    ) -> "JobConfig":
        """The job's configuration from its checked request and its model: the one construction.

        `checkpoint`: the model's shape, when known, so the engine profile
        checks and fits it. Raises UsageError for a checkpoint the engine
        profile refuses (naming the profile to use).
        """
        opts = request.opts
        plan = plan_engine(request, checkpoint)
        limits = DecodeLimits(
            pdf_dpi=opts.pdf_dpi,
            pages_per_unit=opts.pages_per_unit,
            max_pages=opts.max_pages,
            max_file_bytes=opts.max_file_bytes,
            max_image_pixels=opts.max_image_pixels,
            max_side=opts.max_image_side,
            skip_blank_pages=opts.skip_blank_pages == "on",
            upright_pages=opts.upright_pages == "on",
        )
        run = RunInfo(run_id=opts.run_id or new_run_id(), model_id=model_id, prompt_version=prompt_version(request.thinking))
        shards = ShardSettings(
            parquet_id_column=opts.parquet_id_column,
            parquet_bytes_column=opts.parquet_bytes_column,
            parquet_passthrough=tuple(c.strip() for c in opts.parquet_passthrough_columns.split(",") if c.strip()),
        )
        selection = InputSelection(
            include=split_commas(opts.include),
            exclude=split_commas(opts.exclude),
            include_hidden=opts.include_hidden,
            limit=opts.limit,
        )
        # Canonical locations (absolute local paths, no credentials): the same spelling whatever the
        # working directory, and what every worker process reads.
        return JobConfig(
            inputs=tuple(canonical_uri(pattern) for pattern in opts.input or ()),
            manifests=tuple(canonical_uri(manifest) for manifest in split_manifests(opts.manifest)),
            manifest_column=opts.manifest_column,
            selection=selection,
            incremental_from=tuple(canonical_uri(location).rstrip("/") for location in split_commas(opts.incremental_from)),
            shards=shards,
            output=canonical_uri(opts.output).rstrip("/"),
            num_output_shards=opts.num_output_shards,
            progress_interval_s=opts.progress_interval_s,
            tasks=plan.tasks,
            engine=plan.settings(model_path),
            limits=limits,
            run=run,
            model_is_random=model_is_random,
            max_error_fraction=opts.max_error_fraction,
            text_layer=TextLayerSettings(opts.text_layer, opts.text_layer_check),
            count_flagged_as_errors=bool(opts.count_flagged_as_errors),
            max_retries=opts.max_retries,
        )

    @staticmethod
    def from_options(
        options: PipelineOptions, model_path: str, model_id: str, model_is_random: bool,
        checkpoint: Optional[CheckpointShape] = None,
    ) -> "JobConfig":
        """`resolve` for options not validated yet (a Dataflow launcher's argv, benchmarks, tests): values and tasks
        checked, local paths not (the job's inputs are read where it runs). Raises UsageError for any mistake."""
        return JobConfig.resolve(validate(options, local_paths=False), model_path, model_id, model_is_random, checkpoint)

    def summary_config(self) -> SummaryConfig:
        return SummaryConfig(
            run=self.run, output=self.output, tasks_per_item=len(self.tasks), max_error_fraction=self.max_error_fraction,
            count_flagged_as_errors=self.count_flagged_as_errors,
            warnings=self.warnings, model_is_random=self.model_is_random, fail_job_on_failure=self.fail_job_on_failure,
            fields=self._summary_fields(),
        )

    def _summary_fields(self) -> Mapping[str, Any]:
        return {
            "inputs": list(self.inputs),
            "manifests": list(self.manifests),
            "selection": dataclasses.asdict(self.selection),
            "incremental_from": list(self.incremental_from),
            "output": self.output,
            "tasks": [t.name for t in self.tasks],
            "max_tokens": {t.name: t.max_tokens for t in self.tasks},
            "task_vision_tokens": {t.name: t.vision_tokens for t in self.tasks},
            # What each task asks: the report shows its output kind, instruction template and schema.
            "task_definitions": {
                t.name: {"output": t.output.name, "instruction": t.instruction, **({"schema": t.schema} if t.schema is not None else {})}
                for t in self.tasks
            },
            "engine_args": dict(self.engine.engine_args),
            "max_in_flight": self.engine.max_in_flight,
            "host_feeders": self.engine.host_feeders,
            "vision_tokens": self.engine.vision_tokens,
            "thinking": self.engine.thinking,
            "structured_output": self.engine.structured_output,
            "decode_limits": dataclasses.asdict(self.limits),
            "shards": dataclasses.asdict(self.shards),
            "max_error_fraction": self.max_error_fraction,
            "text_layer": dataclasses.asdict(self.text_layer),
            "count_flagged_as_errors": self.count_flagged_as_errors,
            "max_retries": self.max_retries,
        }
