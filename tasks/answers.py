"""Answer parsing: an engine's raw text -> the parsed answer of its task, or an AnswerError.

The parsing functions are pure and defensive; each output kind
(`tasks.kinds`) picks the ones it needs. The engine keeps special tokens in its text
(`skip_special_tokens=False`), so a thought the model emits
(`<|channel>thought\n...<channel|>`, even with thinking off) is split off with
vLLM's own Gemma 4 utility and lands in the `thought` column, never in `text`.
TPU vLLM has no structured output for Gemma 4, so JSON arrives free-form
there: prose and code fences around it, swapped corners, coordinates past
1000 and truncated lists all occur and are repaired here where that is safe,
instead of failing the pipeline. JSON documents are then validated against
their task's JSON Schema (`jsonschema`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jsonschema

from engine.prompts import THOUGHT_END, THOUGHT_START
from library.page_checks import box_to_source
from schemas.records import Detection, ParsedAnswer

_CODE_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
_JSON_START = re.compile(r"[\[{]")
_BOX_LIST_START = re.compile(r"\[\s*\{")
# The thought channel's role label, as Google's templates open it (`<|channel>thought\n`): never a thought itself.
THOUGHT_LABEL = "thought"


class AnswerError(ValueError):
    """An answer that does not hold what its task's output kind needs (a `parse` error row)."""


class DetectionParseError(AnswerError):
    """Model output that is not a usable detection list."""


class NoJSONDocument(AnswerError):
    """An answer of a json task that holds no JSON document."""


class SchemaMismatch(AnswerError):
    """A JSON document that does not validate against its task's schema."""


class CutOffAnswer(AnswerError):
    """An answer that its output limit (`max_tokens`) cut off before it held a usable document."""


class ThoughtUsedAllTokens(CutOffAnswer):
    """A completion whose thought took every output token, leaving no answer."""


class NoJSONFound(ValueError):
    """An answer holding no JSON value the caller accepts."""


@dataclasses.dataclass(frozen=True)
class Answer:
    """A completion split into what the model thought and what it answered."""

    text: str  # the answer: thought channel and end-of-turn markers removed
    thought: Optional[str]  # the thought channel's text; None when the model emitted none


def split_answer(raw: str) -> Answer:
    """Split a completion (decoded with special tokens) into thought and answer.

    Uses vLLM's `gemma4_utils.parse_thinking_output`, which handles a thought
    block with its markers, the stray leading `thought\n` some Gemma 4 models
    emit with thinking off, and trailing `<turn|>`/`<eos>`. It splits at the
    first thought block only; what it leaves in the answer (a further thought
    block, or a thought cut off by `max_tokens` before its end marker) is split
    off the same way, as Google's templates strip every thought block from a
    model turn. The answer never holds a thought marker.
    """
    from vllm.reasoning.gemma4_utils import parse_thinking_output  # imports torch: only where answers are parsed

    parsed = parse_thinking_output(raw)
    thoughts = [parsed["thinking"]]
    answer = parsed["answer"] or ""
    while THOUGHT_START in answer or THOUGHT_END in answer:
        start, end = answer.find(THOUGHT_START), answer.find(THOUGHT_END)
        # Text before a further block's start marker is answer; before a lone end marker, thought (as vLLM reads it).
        cut = start if start != -1 and (end == -1 or start < end) else 0
        head, block = answer[:cut].strip(), answer[cut:]
        again = parse_thinking_output(block if THOUGHT_END in block else block + THOUGHT_END)
        thoughts.append(again["thinking"])
        answer = " ".join(part for part in (head, again["answer"] or "") if part)
    # vLLM strips the channel's `thought\n` label only when text follows it: an empty channel
    # (`<|channel>thought<channel|>`, or one cut off right after its label) leaves the bare label.
    thought = "\n\n".join(t for t in thoughts if t and t != THOUGHT_LABEL)
    return Answer(text=answer, thought=thought or None)


def strip_code_fence(text: str) -> str:
    """The content of a Markdown code fence wrapping the whole answer, else the answer."""
    fenced = _CODE_FENCE.match(text)
    return fenced.group(1).strip() if fenced else text.strip()


def json_values(text: str) -> Iterator[Any]:
    """Every JSON array or object in `text`, in order of where it starts (nested ones too).

    Models wrap JSON in prose and code fences ("Here are the boxes: ```json
    [...]``` The image shows ..."). Every `[` or `{` is tried in order with the
    standard library's `raw_decode`, which reads one complete value and ignores
    what follows; strings are decoded properly, so brackets inside labels do
    not confuse it. `strict=False`: constrained decoding (xgrammar) emits raw
    control characters inside strings (seen in 2 of 3 constrained outputs),
    which strict JSON rejects.
    """
    for _, value in json_values_at(text):
        yield value


def json_values_at(text: str) -> Iterator[tuple[int, Any]]:
    """`json_values`, each with the offset in `text` where it starts."""
    decoder = json.JSONDecoder(strict=False)
    for match in _JSON_START.finditer(text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except (json.JSONDecodeError, RecursionError):
            continue
        yield match.start(), value


def extract_json(text: str, accept: Callable[[Any], bool] = lambda value: True) -> Any:
    """The first JSON array or object in `text` that `accept` takes, wherever it stands.

    `accept` skips values of the wrong shape (a `[1]` in prose before the real answer).
    """
    for value in json_values(text):
        if accept(value):
            return value
    raise NoJSONFound("no JSON value of the expected shape in the answer")


def salvage_json_list(text: str, start: int) -> list[Any]:
    """The complete elements of the JSON list opening at `text[start]` whose tail was cut off."""
    decoder = json.JSONDecoder(strict=False)
    items: list[Any] = []
    pos = start + 1
    while pos < len(text):
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            item, pos = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError):
            break  # the cut-off element
        items.append(item)
    return items


def cut_off_position(text: str) -> str:
    """Where a JSON text that stops mid-way stopped: "inside a string", "inside an object", ... (pure).

    Read from the first `[` or `{` on, as a JSON scanner would: strings (with escapes) and the
    nesting of objects and lists. Tells a user of a cut-off answer what the limit interrupted.
    """
    start = _JSON_START.search(text)
    if start is None:
        return "before any JSON began"
    stack: list[str] = []
    in_string = escaped = False
    last = ""
    for char in text[start.start():]:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "[{":
            stack.append(char)
        elif char in "]}" and stack:
            stack.pop()
        if not char.isspace():
            last = char
    if in_string:
        return "inside a string"
    if last and (last.isdigit() or last in "-.eE+"):
        return "inside a number"
    if not stack:
        return "after a complete JSON value"
    return "inside an object" if stack[-1] == "{" else "inside a list"


def _is_box_list(value: Any) -> bool:
    """A non-empty list of objects, or an object wrapping exactly one such list.

    Non-empty: a bare `[]` inside prose is as likely noise as an answer; an empty
    answer counts only when it is the whole answer.
    """
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        return len(lists) == 1 and _is_box_list(lists[0])
    return isinstance(value, list) and bool(value) and all(isinstance(entry, dict) for entry in value)


def listed_entries(payload: Any, error: type[AnswerError], noun: str) -> list[Any]:
    """The entries of a JSON list answer: the list, the one list an object wraps (`{"objects": [...]}`), or a lone entry."""
    if isinstance(payload, list):
        return payload
    if isinstance(payload, dict):
        if "box_2d" in payload:
            return [payload]  # a single entry without the surrounding list
        lists = [value for value in payload.values() if isinstance(value, list)]
        if len(lists) == 1:
            return lists[0]  # e.g. {"objects": [...]}
    raise error(f"expected a JSON list of {noun}, got {type(payload).__name__}")


def box_coordinates(entry: Any, index: int, error: type[AnswerError]) -> list[float]:
    """An entry's `box_2d` as 4 finite numbers (any order, any range: `to_detection` repairs both), or `error`."""
    if not isinstance(entry, dict):
        raise error(f"entry {index}: expected an object, got {type(entry).__name__}")
    box = entry.get("box_2d")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise error(f"entry {index}: box_2d must be a list of 4 numbers, got {box!r}")
    return [_coordinate(value, index, error) for value in box]


def _coordinate(value: Any, entry_index: int, error: type[AnswerError]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise error(f"entry {entry_index}: coordinate {value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise error(f"entry {entry_index}: coordinate {value!r} is not a number") from None
    if not math.isfinite(number):
        raise error(f"entry {entry_index}: coordinate {value!r} is not finite")
    return number


def _clip_1000(value: float) -> int:
    return int(round(min(1000.0, max(0.0, value))))


def to_detection(label: str, box: Sequence[float], width: int, height: int) -> Optional[Detection]:
    """Clip to 0-1000, put corners in order, convert frames; None for a zero-area box."""
    y0, x0, y1, x1 = (_clip_1000(v) for v in box)
    ymin, ymax = sorted((y0, y1))
    xmin, xmax = sorted((x0, x1))
    if ymin == ymax or xmin == xmax:
        return None
    box_1000 = (ymin, xmin, ymax, xmax)
    box_norm = tuple(v / 1000.0 for v in box_1000)
    box_px = (
        int(round(ymin * height / 1000.0)),
        int(round(xmin * width / 1000.0)),
        int(round(ymax * height / 1000.0)),
        int(round(xmax * width / 1000.0)),
    )
    return Detection(label=label, box_1000=box_1000, box_norm=box_norm, box_px=box_px)  # type: ignore[arg-type]


def _on_source(box_norm: tuple[float, float, float, float], rotation: int, width: int, height: int) -> tuple[
    tuple[float, float, float, float], tuple[int, int, int, int]
]:
    norm = box_to_source(box_norm, rotation)
    ymin, xmin, ymax, xmax = norm
    return norm, (int(round(ymin * height)), int(round(xmin * width)), int(round(ymax * height)), int(round(xmax * width)))


def boxes_on_source(parsed: ParsedAnswer, rotation: int, width: int, height: int) -> ParsedAnswer:
    """`parsed` with the boxes the model drew on the page turned `rotation` degrees clockwise moved to the
    source's frame (`box`, `box_px` of a `width` x `height` source); `box_1000` stays as the model emitted it."""
    if not rotation:
        return parsed
    detections = None if parsed.detections is None else tuple(
        dataclasses.replace(d, **dict(zip(("box_norm", "box_px"), _on_source(d.box_norm, rotation, width, height))))
        for d in parsed.detections
    )
    blocks = None if parsed.blocks is None else tuple(
        b if b.box_norm is None else dataclasses.replace(
            b, **dict(zip(("box_norm", "box_px"), _on_source(b.box_norm, rotation, width, height))))
        for b in parsed.blocks
    )
    return dataclasses.replace(parsed, detections=detections, blocks=blocks)


def listed_payload(answer: str, truncated: bool, error: type[AnswerError], noun: str) -> Any:
    """The answer's JSON: all of it, else a list of boxed entries wherever it stands, else (`truncated`) a cut-off list's complete entries."""
    try:
        return json.loads(strip_code_fence(answer), strict=False)  # the answer is JSON and nothing else
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return extract_json(answer, accept=_is_box_list)
    except NoJSONFound:
        opening = _BOX_LIST_START.search(answer)
        if truncated and opening:
            return salvage_json_list(answer, opening.start())
        if truncated:
            raise error(f"truncated output holds no JSON list of {noun}") from None
        raise error(f"no JSON list of {noun} in the answer") from None


def parse_detections(answer: str, width: int, height: int, truncated: bool = False) -> list[Detection]:
    """Gemma-style `[{"box_2d": [ymin, xmin, ymax, xmax], "label": ...}]` -> validated boxes.

    `answer` is the model's answer with the thought split off (`split_answer`).
    Repairs what is safely repairable (prose and fences around the list,
    swapped corners, out-of-range values, a truncated tail when `truncated`)
    and raises DetectionParseError for anything else. Zero-area boxes are dropped.
    """
    detections = []
    payload = listed_payload(answer, truncated, DetectionParseError, "boxes")
    for index, entry in enumerate(listed_entries(payload, DetectionParseError, "boxes")):
        box = box_coordinates(entry, index, DetectionParseError)
        label = entry.get("label", "")
        if not isinstance(label, str):
            raise DetectionParseError(f"entry {index}: label must be a string, got {label!r}")
        detection = to_detection(label.strip(), box, width, height)
        if detection is not None:
            detections.append(detection)
    return detections


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str) -> Any:
    schema = json.loads(schema_json)
    return jsonschema.validators.validator_for(schema)(schema)


def _whole(answer: str) -> Iterator[Any]:
    try:
        yield json.loads(strip_code_fence(answer), strict=False)
    except (json.JSONDecodeError, RecursionError):
        return


def _json_candidates(answer: str, schema: Mapping[str, Any], truncated: bool) -> Iterator[Any]:
    """What the answer may hold, most literal first: itself, then each JSON value in it, then a cut-off list's elements."""
    yield from _whole(answer)
    yield from json_values(answer)
    if truncated and schema.get("type") == "array":
        opening = answer.find("[")
        if opening != -1:
            yield salvage_json_list(answer, opening)


def _finite(value: Any) -> bool:
    """No NaN or Infinity anywhere: Python's json reads them, but they are not JSON (DuckDB, BigQuery refuse them)."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def parse_json_document(answer: str, schema: Mapping[str, Any], truncated: bool = False) -> str:
    """The JSON document in an answer that validates against `schema`, as compact JSON text; or NoJSONDocument / SchemaMismatch.

    Repairs only what cannot change the document's meaning: prose and code
    fences around it (the first JSON value that validates wins), raw control
    characters inside strings, and, when the answer was cut off by
    `max_tokens` and the schema asks for a list, the list's complete
    elements (the cut one is dropped; the rest must still validate). A
    document that does not validate is reported with the schema's first
    complaint about the first candidate, and the raw answer is kept.
    """
    validator = _validator(json.dumps(schema, sort_keys=True))
    complaint = None
    for value in _json_candidates(answer, schema, truncated):
        if not _finite(value):
            complaint = complaint or "answer holds NaN or Infinity, which JSON does not allow"
            continue
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is None:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if complaint is None:
            where = "/".join(str(part) for part in error.absolute_path) or "the document"
            complaint = f"answer does not match the schema at {where}: {error.message}"
    if complaint is not None:
        raise SchemaMismatch(complaint[:1000])
    raise NoJSONDocument("no JSON document in the answer" + (" (cut off by max_tokens)" if truncated else ""))
