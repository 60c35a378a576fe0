"""`--task_file`: user tasks from a YAML or JSON file, validated with one clear line per mistake.

    tasks:
      - name: invoice
        instruction: "Extract the invoice number and total."
        output: json
        schema: {type: object, properties: {number: {type: string}, total: {type: number}}, required: [number]}
        max_tokens: 256
      - name: answer
        instruction: "Answer briefly: {question}"
        output: text
        max_tokens: 64

Fields of a task (`TASK_FIELDS`): `name` and `instruction` are required;
`output` is `text` (default), `boxes` or `json`; `schema` (a JSON Schema) is
required for `json` and only for it; `max_tokens`, `temperature`, `top_k`,
`top_p`, `vision_tokens` and `retries` are optional. `{placeholders}` in
the instruction are filled from each item's metadata
(`transforms.metadata`). Files ending `.json` are read as JSON, others as
YAML; local paths and gs:// URIs both work (read once, at launch).
"""
from __future__ import annotations

import difflib
import json
from typing import Any, Mapping, Optional, Sequence

import jsonschema
import yaml
from apache_beam.io.filesystems import FileSystems

from transforms.builtin_tasks import BUILTIN_TASKS, DETECTION_JSON_SCHEMA, DETECTION_MAX_TOKENS
from transforms.prompts import VISION_TOKEN_BUDGETS, Sampling
from transforms.tasks import TASK_NAME, OutputKind, RetryRung, Task, Template, default_retries

# vLLM's own bounds (vllm/sampling_params.py SamplingParams._verify_args): 0 <= temperature <= 2,
# 0 < top_p <= 1, top_k >= 1 (0 and -1 mean "all", which is what leaving it out does here).
_SAMPLING = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_k": {"type": "integer", "minimum": 1},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
}
TASK_FIELDS: Mapping[str, Mapping[str, Any]] = {
    "name": {"type": "string", "pattern": TASK_NAME.pattern},
    "instruction": {"type": "string", "minLength": 1},
    "output": {"enum": [kind.value for kind in OutputKind]},
    "schema": {"type": "object"},
    "max_tokens": {"type": "integer", "minimum": 1},
    **_SAMPLING,
    "vision_tokens": {"enum": list(VISION_TOKEN_BUDGETS)},
    "retries": {
        "type": "array",
        "maxItems": 5,
        "items": {
            "type": "object",
            "required": ["temperature"],
            "additionalProperties": False,
            "properties": {"temperature": _SAMPLING["temperature"], "instruction": {"type": "string", "minLength": 1}},
        },
    },
}
TASK_FILE_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "required": ["tasks"],
    "additionalProperties": False,
    "properties": {
        "tasks": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object", "required": ["name", "instruction"], "additionalProperties": False, "properties": TASK_FIELDS},
        }
    },
}
_DEFAULT_MAX_TOKENS = {OutputKind.TEXT: 512, OutputKind.JSON: 512, OutputKind.BOXES: DETECTION_MAX_TOKENS}


class TaskFileError(ValueError):
    """A task file that cannot be used; the message has one line per mistake."""

    def __init__(self, path: str, mistakes: Sequence[str]):
        self.mistakes = list(mistakes)
        super().__init__(f"{path}: " + ("\n  ".join(["task file refused:", *self.mistakes]) if len(mistakes) > 1 else mistakes[0]))


def _where(document: Any, path: Sequence[Any]) -> str:
    """`task 'invoice' (tasks[0]), field output` for a location inside the document."""
    if len(path) < 2 or path[0] != "tasks":
        return "the file" if not path else f"field {path[0]}"
    entry = document["tasks"][path[1]]
    name = entry.get("name") if isinstance(entry, dict) else None
    task = f"task {name!r} (tasks[{path[1]}])" if isinstance(name, str) else f"tasks[{path[1]}]"
    rest = ".".join(str(part) if not isinstance(part, int) else f"[{part}]" for part in path[2:]).replace(".[", "[")
    return f"{task}, field {rest}" if rest else task


def _sentence(error: jsonschema.ValidationError) -> str:
    """What is wrong, in words a user acts on."""
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, allowed, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return f"unknown field {', '.join(hints)}; the fields are {', '.join(allowed)}"
    if error.validator == "required":
        return error.message.replace("is a required property", "is required")
    if error.validator == "enum":
        return f"{error.instance!r} is not allowed; choose {', '.join(map(str, error.validator_value))}"
    if error.validator == "pattern":
        return f"{error.instance!r}: use lower-case letters, digits and _ (at most 40), starting with a letter"
    if error.validator == "type":
        return f"expected {'an' if error.validator_value[0] in 'aeio' else 'a'} {error.validator_value}, got {error.instance!r}"
    return error.message


def _structure_mistakes(document: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(TASK_FILE_SCHEMA)
    errors = sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_where(document, list(e.absolute_path))}: {_sentence(e)}" for e in errors]


def _entry_mistakes(entry: Mapping[str, Any], where: str, seen: set[str]) -> list[str]:
    """Mistakes the file's JSON Schema cannot see: names, schemas, templates, retries."""
    mistakes = []
    name, output = entry["name"], OutputKind(entry.get("output", "text"))
    if name in BUILTIN_TASKS:
        mistakes.append(f"{where}: name {name!r} is a built-in task; choose another name")
    if name in seen:
        mistakes.append(f"{where}: name {name!r} is used by an earlier task")
    seen.add(name)
    if output is OutputKind.JSON and "schema" not in entry:
        mistakes.append(f"{where}: output json needs a schema (a JSON Schema of the answer)")
    if output is not OutputKind.JSON and "schema" in entry:
        mistakes.append(f"{where}, field schema: only json tasks have a schema (boxes answers use Gemma's box format)")
    if "schema" in entry:
        try:
            jsonschema.validators.validator_for(entry["schema"]).check_schema(entry["schema"])
        except jsonschema.SchemaError as exc:
            at = "/".join(str(part) for part in exc.absolute_path) or "its root"
            mistakes.append(f"{where}, field schema: not a valid JSON Schema at {at}: {exc.message}")
    if output is OutputKind.TEXT and "retries" in entry:
        mistakes.append(f"{where}, field retries: only boxes and json answers are validated, so only they are retried")
    templates = [("instruction", entry["instruction"])] + [
        (f"retries[{index}].instruction", rung["instruction"]) for index, rung in enumerate(entry.get("retries", ())) if "instruction" in rung
    ]
    for field, text in templates:
        try:
            Template(text)
        except ValueError as exc:
            mistakes.append(f"{where}, field {field}: {exc}")
    return mistakes


def _task(entry: Mapping[str, Any]) -> Task:
    output = OutputKind(entry.get("output", "text"))
    schema = entry.get("schema") if output is OutputKind.JSON else DETECTION_JSON_SCHEMA if output is OutputKind.BOXES else None
    retries = (
        tuple(RetryRung(rung["temperature"], rung.get("instruction")) for rung in entry["retries"])
        if "retries" in entry
        else default_retries(output, entry["instruction"], schema)
    )
    return Task(
        name=entry["name"],
        instruction=entry["instruction"],
        output=output,
        max_tokens=entry.get("max_tokens", _DEFAULT_MAX_TOKENS[output]),
        sampling=Sampling(**{key: entry[key] for key in _SAMPLING if key in entry}),
        schema=schema,
        vision_tokens=entry.get("vision_tokens"),
        retries=retries,
    )


def parse_task_file(text: str, path: str) -> tuple[Task, ...]:
    """The tasks a task file's text defines (JSON when `path` ends in .json, else YAML), or TaskFileError."""
    try:
        document = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TaskFileError(path, [f"not valid {'JSON' if path.lower().endswith('.json') else 'YAML'}: {' '.join(str(exc).split())}"]) from None
    mistakes = _structure_mistakes(document)
    if mistakes:
        raise TaskFileError(path, mistakes)
    seen: set[str] = set()
    for index, entry in enumerate(document["tasks"]):
        mistakes += _entry_mistakes(entry, _where(document, ["tasks", index]), seen)
    if mistakes:
        raise TaskFileError(path, mistakes)
    try:
        return tuple(_task(entry) for entry in document["tasks"])
    except ValueError as exc:  # the contract's own checks (e.g. a retry naming a value the instruction does not)
        raise TaskFileError(path, [str(exc)]) from None


def load_task_file(path: Optional[str]) -> tuple[Task, ...]:
    """The tasks of `--task_file` (local or gs://); none without one."""
    if not path:
        return ()
    try:
        with FileSystems.open(path) as handle:
            text = handle.read().decode("utf-8")
    except UnicodeDecodeError:
        raise TaskFileError(path, ["not UTF-8 text"]) from None
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable file: one line naming it
        raise TaskFileError(path, [f"cannot be read ({type(exc).__name__}: {exc})"]) from None
    return parse_task_file(text, path)
