"""The flex template's metadata.json, generated from the pipeline's own option parser.

Every option of `configuration.options.VisionBatchOptions` (and the preflight
canary's two, `launch.canary.CanaryOptions`) becomes a template parameter,
with the parser's help text; a small table adds labels, regexes
and GCS pickers where the parser alone says too little. A new pipeline option
appears here without any change (with a label derived from its name), and
tests fail until the committed metadata.json is regenerated:

    python -m launch.flex_template --write
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
from typing import Any, Mapping, Optional, Sequence

from configuration.options import VisionBatchOptions
from launch.canary import CanaryOptions
from launch.profiles import PROFILES
from tasks.task import TASK_NAME

METADATA_PATH = pathlib.Path(__file__).resolve().parent / "metadata.json"
_GCS = r"^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?$"  # gs://BUCKET[/PATH], bucket naming rules
_TASK = TASK_NAME.pattern.strip("^$")  # built-in tasks and a task file's (checked against both at launch)
# Gemma 4's image budgets (huggingface/transformers src/transformers/models/gemma4/image_processing_gemma4.py,
# _SUPPORTED_SOFT_TOKENS). One template serves TPU and GPU profiles: both serve every budget whole.
_VISION_BUDGETS = ["70", "140", "280", "560", "1120"]


@dataclasses.dataclass(frozen=True)
class ParameterUI:
    """What the parser cannot say: a label, stricter validation, a GCS picker, whether the template needs it."""

    label: Optional[str] = None
    regexes: Optional[Sequence[str]] = None
    param_type: Optional[str] = None  # Dataflow ParameterType name (GCS pickers)
    required: bool = False


PARAMETER_UI: Mapping[str, ParameterUI] = {
    "input": ParameterUI("Input files (glob)", [_GCS], "GCS_READ_FILE"),
    "manifest": ParameterUI("Input manifest", [_GCS], "GCS_READ_FILE"),
    # {date} becomes the launch's UTC date (launch/run_dataflow.py): one output per night.
    "output": ParameterUI("Output location", [_GCS], "GCS_WRITE_FOLDER", required=True),
    "incremental_from": ParameterUI("Earlier outputs to skip (incremental run)", [_GCS], "GCS_READ_FOLDER"),
    # Dataflow workers need a real checkpoint in GCS; the tiny local default does not exist on them.
    "model": ParameterUI("Gemma 4 checkpoint (Hugging Face format)", [_GCS], "GCS_READ_FOLDER", required=True),
    "tasks": ParameterUI("Tasks", [rf"^({_TASK})(,({_TASK}))*$"]),
    "task_file": ParameterUI("Your own tasks (YAML or JSON task file)", [_GCS], "GCS_READ_FILE"),
    # Only the accelerator engine profiles: the launcher's workers are TPU or GPU VMs.
    "engine_profile": ParameterUI(
        "vLLM engine profile", [f"^({'|'.join(sorted({p.engine_profile for p in PROFILES.values()}))})$"]
    ),
    "vision_tokens": ParameterUI("Image soft-token budget", [f"^({'|'.join(_VISION_BUDGETS)})$"]),
    "xla_cache_path": ParameterUI("Persistent XLA compile cache", [_GCS], "GCS_WRITE_FOLDER"),
    "engine_arg": ParameterUI("vLLM engine argument override (one KEY=VALUE)", [r"^[a-z_]+=.+$"]),
    "max_tokens": ParameterUI("Output token limit override (one TASK=N)", [rf"^({_TASK})=[0-9]+$"]),
    # Set by launch.preflight: the canary's findings prefix, and the token its probe logs.
    "preflight_findings": ParameterUI("Preflight canary: findings location", [_GCS], "GCS_WRITE_FOLDER"),
    "preflight_marker": ParameterUI("Preflight canary: log marker", [r"^[a-z0-9-]+$"]),
    "task_vision_tokens": ParameterUI(
        "A task's own image budget (one TASK=N)", [rf"^({_TASK})=({'|'.join(_VISION_BUDGETS)})$"]
    ),
}


def pipeline_options() -> list[argparse.Action]:
    """The pipeline's own options, exactly as its parser declares them, and the preflight canary's."""
    parser = argparse.ArgumentParser(add_help=False)
    VisionBatchOptions._add_argparse_args(parser)  # Beam's hook for declaring options; called as Beam does
    CanaryOptions._add_argparse_args(parser)
    return [action for action in parser._actions if action.option_strings]


def _derived_regexes(action: argparse.Action) -> list[str]:
    if action.choices:
        return [f"^({'|'.join(re.escape(str(choice)) for choice in action.choices)})$"]
    if action.type is int:
        return [r"^[0-9]+$"]
    if action.type is float:
        return [r"^[0-9]+(\.[0-9]+)?$"]
    return []


def _help_text(action: argparse.Action) -> str:
    text = (action.help or "").strip()
    if isinstance(action, argparse._AppendAction):
        text += " One value per template launch."
    if action.default not in (None, "", []):
        text += f" Default: {action.default}."
    return text


def parameter(action: argparse.Action) -> dict[str, Any]:
    ui = PARAMETER_UI.get(action.dest, ParameterUI())
    entry: dict[str, Any] = {
        "name": action.dest,
        "label": ui.label or action.dest.replace("_", " ").capitalize(),
        "helpText": _help_text(action),
        "isOptional": not ui.required,
    }
    regexes = list(ui.regexes) if ui.regexes is not None else _derived_regexes(action)
    if regexes:
        entry["regexes"] = regexes
    if ui.param_type:
        entry["paramType"] = ui.param_type
    return entry


def metadata() -> dict[str, Any]:
    """metadata.json content; raises if the UI table names an option the pipeline no longer has."""
    actions = pipeline_options()
    stale = sorted(set(PARAMETER_UI) - {action.dest for action in actions})
    if stale:
        raise ValueError(f"PARAMETER_UI describes options the pipeline does not have: {stale}")
    return {
        "name": "Vision batch (Gemma 4 on Dataflow TPU/GPU)",
        "description": "OCR, captions and object detection over images and PDFs with Gemma 4 on vLLM TPU or GPU workers. "
                       "Launch it with launch.submit --template or the nightly schedule (docs/operations.md).",
        "parameters": [parameter(action) for action in actions],
    }


def render() -> str:
    return json.dumps(metadata(), indent=2, sort_keys=False) + "\n"
