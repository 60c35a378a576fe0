"""Parse stage: engine completions -> result rows, or error rows when validation fails.

The parsing functions are pure and defensive. TPU vLLM has no structured
output for Gemma 4, so detection JSON arrives free-form there: code fences,
a thinking preamble, swapped corners, coordinates past 1000 and truncated
lists all occur and are repaired here instead of failing the pipeline.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam import pvalue

from schemas.records import Detection, ErrorRecord, RunInfo, TaskCompletion
from schemas.tables import result_row
from transforms import metrics
from transforms.prompts import TaskSpec

ERRORS_TAG = "errors"

_THINKING = re.compile(r"<\|channel>.*?<channel\|>", re.DOTALL)
_CODE_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


class DetectionParseError(ValueError):
    """Model output that is not a usable detection list."""


def strip_wrappers(text: str) -> str:
    """Remove a thinking block and a Markdown code fence around the answer."""
    text = _THINKING.sub("", text).strip()
    fenced = _CODE_FENCE.match(text)
    return fenced.group(1).strip() if fenced else text


def _salvage_array_prefix(text: str) -> list[Any]:
    """The complete elements of a JSON array whose tail was cut off (finish_reason == "length")."""
    start = text.find("[")
    if start < 0:
        raise DetectionParseError("truncated output holds no JSON list")
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
        except json.JSONDecodeError:
            break  # the cut-off element
        items.append(item)
    return items


def _top_level_entries(payload: Any) -> list[Any]:
    if isinstance(payload, list):
        return payload
    if isinstance(payload, dict):
        if "box_2d" in payload:
            return [payload]  # a single box without the surrounding list
        lists = [value for value in payload.values() if isinstance(value, list)]
        if len(lists) == 1:
            return lists[0]  # e.g. {"objects": [...]}
    raise DetectionParseError(f"expected a JSON list of boxes, got {type(payload).__name__}")


def _coordinate(value: Any, entry_index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DetectionParseError(f"entry {entry_index}: coordinate {value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise DetectionParseError(f"entry {entry_index}: coordinate {value!r} is not a number") from None
    if not math.isfinite(number):
        raise DetectionParseError(f"entry {entry_index}: coordinate {value!r} is not finite")
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


def parse_detections(text: str, width: int, height: int, truncated: bool = False) -> list[Detection]:
    """Gemma-style `[{"box_2d": [ymin, xmin, ymax, xmax], "label": ...}]` -> validated boxes.

    Repairs what is safely repairable (fences, thinking, swapped corners,
    out-of-range values, a truncated tail when `truncated`) and raises
    DetectionParseError for anything else. Zero-area boxes are dropped.
    """
    body = strip_wrappers(text)
    try:
        # strict=False: xgrammar lets raw control characters through inside strings
        # (seen in 2 of 3 constrained outputs); plain json.loads rejects them.
        payload: Any = json.loads(body, strict=False)
    except json.JSONDecodeError as exc:
        if not truncated:
            raise DetectionParseError(f"not valid JSON: {exc}") from None
        payload = _salvage_array_prefix(body)
    detections = []
    for index, entry in enumerate(_top_level_entries(payload)):
        if not isinstance(entry, dict):
            raise DetectionParseError(f"entry {index}: expected an object, got {type(entry).__name__}")
        box = entry.get("box_2d")
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise DetectionParseError(f"entry {index}: box_2d must be a list of 4 numbers, got {box!r}")
        label = entry.get("label", "")
        if not isinstance(label, str):
            raise DetectionParseError(f"entry {index}: label must be a string, got {label!r}")
        detection = to_detection(label.strip(), [_coordinate(v, index) for v in box], width, height)
        if detection is not None:
            detections.append(detection)
    return detections


class ParseCompletions(beam.DoFn):
    """TaskCompletion -> results row; completions that fail validation -> ErrorRecord (tag `errors`)."""

    def __init__(self, tasks: dict[str, TaskSpec], run: RunInfo):
        self._tasks = tasks
        self._run = run

    def process(self, completion: TaskCompletion) -> Iterator[Any]:
        spec = self._tasks[completion.task]
        truncated = completion.finish_reason == "length"
        if truncated:
            metrics.count("truncated_outputs")
        text = strip_wrappers(completion.text)
        detections = None
        if spec.produces_boxes:
            info = completion.info
            try:
                detections = parse_detections(text, info.width, info.height, truncated=truncated)
            except DetectionParseError as exc:
                metrics.count("errors_parse")
                if completion.attempts > 1:
                    exc = DetectionParseError(f"{exc} (after {completion.attempts} attempts)")
                yield pvalue.TaggedOutput(
                    ERRORS_TAG,
                    ErrorRecord.from_exception(
                        info.ref,
                        "parse",
                        exc,
                        task=completion.task,
                        content_hash=info.content_hash,
                        raw_output=completion.text,
                        metadata=info.metadata,
                        attempts=completion.attempts,
                    ),
                )
                return
            metrics.count("detections", len(detections))
        yield result_row(dataclasses.replace(completion, text=text), self._run, detections)
