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
`output` names an output kind (`tasks.kinds.KINDS`: `text`, the default,
`boxes`, `json`, `layout`), which decides the defaults and the rest: `schema`
(a JSON Schema) is required for kinds that need one (`json`) and only for
them; `retries` (answers that fail validation, and degenerate `text` answers, climb it), `max_tokens`,
`temperature`, `top_k`, `top_p`, `vision_tokens` and `text_layer` are optional (`text_layer`: what a
PDF page's text layer does for the task under `--text_layer auto|anchor`: `none`, the default; `answer`,
text tasks only: trusted pages are answered by the layer; `anchor`: the layer's text goes into the prompt); `max_tokens` is bounded
by the caller (the longest context any engine profile holds). Every mistake of
a file is reported at once: the schema's, the entries' own checks and the
task contract's. `{placeholders}` in
the instruction are filled from each item's metadata
(`library.metadata`). Files ending `.json` are read as JSON, others as
YAML; local paths and gs:// URIs both work (read once, at launch).
"""
from __future__ import annotations

import difflib
import json
from typing import Any, Callable, Mapping, Optional, Sequence

import jsonschema
import yaml
from apache_beam.io.filesystems import FileSystems

from engine.prompts import VISION_TOKEN_BUDGETS, Sampling
from library import storage
from tasks.builtin import BUILTIN_TASKS
from tasks.kinds import KINDS, OutputKind
from tasks.kinds.base import RetryRung
from tasks.task import TASK_NAME, Task, Template
from tasks.text_layer import LAYER_USES

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
    "output": {"enum": list(KINDS)},
    "schema": {"type": "object"},
    "max_tokens": {"type": "integer", "minimum": 1},
    **_SAMPLING,
    "vision_tokens": {"enum": list(VISION_TOKEN_BUDGETS)},
    "text_layer": {"enum": list(LAYER_USES)},
    "retries": {
        "type": "array",
        "maxItems": 5,
        "items": {
            "type": "object",
            "required": ["temperature"],
            "additionalProperties": False,
            "properties": {
                "temperature": _SAMPLING["temperature"], "instruction": {"type": "string", "minLength": 1},
                # vLLM's bounds are (0, inf) (vllm/sampling_params.py); past 2 a guard garbles any text.
                "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 2},
                "max_tokens_scale": {"type": "integer", "minimum": 1, "maximum": 4},
            },
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


def _kinds(which: Callable[[OutputKind], bool]) -> str:
    """The kinds `which` holds for, as a mistake names them: "json", "boxes, json and layout"."""
    names = [name for name, kind in KINDS.items() if which(kind)]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


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


def _task_index(path: Sequence[Any]) -> Optional[int]:
    """The task a location inside the document belongs to (None: the file itself)."""
    return path[1] if len(path) >= 2 and path[0] == "tasks" and isinstance(path[1], int) else None


def _structure_mistakes(document: Any) -> list[tuple[Optional[int], str]]:
    """(task index, mistake) for everything the file's JSON Schema refuses."""
    validator = jsonschema.Draft202012Validator(TASK_FILE_SCHEMA)
    errors = sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    return [(_task_index(list(e.absolute_path)), f"{_where(document, list(e.absolute_path))}: {_sentence(e)}") for e in errors]


def _output_kind(entry: Mapping[str, Any]) -> Optional[OutputKind]:
    """The entry's output kind; None when it names none there is (the schema check reports that)."""
    output = entry.get("output", "text")
    return KINDS.get(output) if isinstance(output, str) else None


def _entry_mistakes(entry: Mapping[str, Any], where: str, seen: set[str], max_tokens_limit: Optional[int]) -> list[str]:
    """Mistakes the file's JSON Schema cannot see: names, schemas, templates, retries, limits.

    Each check looks only at fields of the right type, so it runs beside the
    schema's own mistakes (which name the others): a file's mistakes all come in one pass.
    """
    mistakes = []
    name, output = entry.get("name"), _output_kind(entry)
    if isinstance(name, str):
        if name in BUILTIN_TASKS:
            mistakes.append(f"{where}: name {name!r} is a built-in task; choose another name")
        if name in seen:
            mistakes.append(f"{where}: name {name!r} is used by an earlier task")
        seen.add(name)
    if output is not None and output.needs_schema and "schema" not in entry:
        mistakes.append(f"{where}: output {output.name} needs a schema (a JSON Schema of the answer)")
    if output is not None and not output.needs_schema and "schema" in entry:
        mistakes.append(f"{where}, field schema: only {_kinds(lambda kind: kind.needs_schema)} tasks have a schema "
                        "(boxes answers use Gemma's box format)")
    if isinstance(entry.get("schema"), dict):
        try:
            jsonschema.validators.validator_for(entry["schema"]).check_schema(entry["schema"])
        except jsonschema.SchemaError as exc:
            at = "/".join(str(part) for part in exc.absolute_path) or "its root"
            mistakes.append(f"{where}, field schema: not a valid JSON Schema at {at}: {exc.message}")
    if output is not None and output.column is not None and entry.get("text_layer") == "answer":
        mistakes.append(f"{where}, field text_layer: only text tasks can be answered by a PDF page's text layer; "
                        "use anchor to give the model the layer's text")
    max_tokens = entry.get("max_tokens")
    if max_tokens_limit is not None and isinstance(max_tokens, int) and max_tokens > max_tokens_limit:
        mistakes.append(f"{where}, field max_tokens: {max_tokens} is more than any engine profile's context holds "
                        f"({max_tokens_limit} tokens, the prompt included)")
    rungs = entry.get("retries") if isinstance(entry.get("retries"), list) else []
    templates = [("instruction", entry.get("instruction"))] + [
        (f"retries[{index}].instruction", rung["instruction"]) for index, rung in enumerate(rungs)
        if isinstance(rung, dict) and "instruction" in rung
    ]
    for field, text in templates:
        if not isinstance(text, str):
            continue  # missing or not text: the schema's mistake
        try:
            Template(text)
        except ValueError as exc:
            mistakes.append(f"{where}, field {field}: {exc}")
    return mistakes


def _task(entry: Mapping[str, Any]) -> Task:
    output = KINDS[entry.get("output", "text")]
    schema = entry.get("schema")  # only kinds that need one have one (_entry_mistakes)
    retries = (
        tuple(
            RetryRung(rung["temperature"], rung.get("instruction"), rung.get("repetition_penalty"), rung.get("max_tokens_scale", 1))
            for rung in entry["retries"]
        )
        if "retries" in entry
        else output.retries(entry["instruction"], schema)
    )
    return Task(
        name=entry["name"],
        instruction=entry["instruction"],
        output=output,
        max_tokens=entry.get("max_tokens", output.max_tokens),
        sampling=Sampling(**{key: entry[key] for key in _SAMPLING if key in entry}),
        schema=schema,
        vision_tokens=entry.get("vision_tokens"),
        retries=retries,
        text_layer=entry.get("text_layer", "none"),
    )


def parse_task_file(text: str, path: str, max_tokens_limit: Optional[int] = None) -> tuple[Task, ...]:
    """The tasks a task file's text defines (JSON when `path` ends in .json, else YAML), or TaskFileError.

    Every mistake of the file is listed at once, the file's own first, then
    task by task. `max_tokens_limit`: the largest `max_tokens` accepted (the
    caller knows the engines; none here).
    """
    try:
        document = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TaskFileError(path, [f"not valid {'JSON' if path.lower().endswith('.json') else 'YAML'}: {' '.join(str(exc).split())}"]) from None
    mistakes = _structure_mistakes(document)
    refused = {at for at, _ in mistakes}  # entries the schema already refused
    entries = document.get("tasks") if isinstance(document, dict) else None
    tasks: list[Task] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries if isinstance(entries, list) else ()):
        if not isinstance(entry, dict):
            continue
        found = _entry_mistakes(entry, _where(document, ["tasks", index]), seen, max_tokens_limit)
        mistakes += [(index, mistake) for mistake in found]
        if not found and index not in refused:
            try:
                tasks.append(_task(entry))
            except ValueError as exc:  # the contract's own checks (e.g. a retry naming a value the instruction does not); they name the task
                mistakes.append((index, str(exc)))
    if mistakes:
        # Stable: the file's own mistakes (-1) first, then each task's in the order they were found.
        raise TaskFileError(path, [mistake for _, mistake in sorted(mistakes, key=lambda m: -1 if m[0] is None else m[0])])
    return tuple(tasks)


def load_task_file(path: Optional[str], max_tokens_limit: Optional[int] = None) -> tuple[Task, ...]:
    """The tasks of `--task_file` (local or gs://); none without one."""
    if not path:
        return ()
    try:
        with FileSystems.open(path) as handle:
            text = handle.read().decode("utf-8-sig")  # a byte-order mark (Notepad, Excel) is not JSON
    except UnicodeDecodeError:
        raise TaskFileError(path, ["not UTF-8 text"]) from None
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable file: one line naming it
        storage.raise_if_outage(exc)  # ... but storage being down is no mistake in the file or its name
        raise TaskFileError(path, [f"cannot be read ({type(exc).__name__}: {exc})"]) from None
    return parse_task_file(text, path, max_tokens_limit)
