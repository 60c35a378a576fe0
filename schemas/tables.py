"""The two Parquet tables the pipeline writes, and the pure functions that build their rows.

Designed for the people who query them (pyarrow, DuckDB, BigQuery external
tables): flat scalar columns for filtering and joining, one nested list of
boxes (and one of layout blocks), JSON documents as JSON text (`data`, `metadata`: DuckDB's and
BigQuery's JSON functions read them), explicit types (no "object" columns),
UTC timestamps. README.md
documents every column; `tests/test_tables.py` round-trips both schemas.
"""
from __future__ import annotations

import datetime
from typing import Any, Optional, Sequence

import pyarrow as pa

from schemas.records import Block, Detection, ErrorRecord, ItemRef, ParsedAnswer, RunInfo, TaskCompletion


def _box(value_type: pa.DataType) -> pa.StructType:
    return pa.struct([("ymin", value_type), ("xmin", value_type), ("ymax", value_type), ("xmax", value_type)])


_FRAMES = [
    ("box_1000", _box(pa.int32())),  # as the model emits it, 0-1000, after clipping and corner repair
    ("box", _box(pa.float32())),  # 0-1 fractions of width/height
    ("box_px", _box(pa.int32())),  # pixels of the source image (after EXIF orientation)
]
DETECTION_TYPE = pa.struct([("label", pa.string())] + _FRAMES)
# A layout block: reading-order index, category, text, and its box in the frames of a detection (null: no area).
FIELD_CONFIDENCE_TYPE = pa.struct([("field", pa.string()), ("confidence", pa.float32())])
BLOCK_TYPE = pa.struct([("index", pa.int32()), ("category", pa.string()), ("text", pa.string())] + _FRAMES)

_ITEM_FIELDS = [
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("page", pa.int32()),
    pa.field("member", pa.string()),
    pa.field("content_hash", pa.string()),
    pa.field("metadata", pa.string()),  # JSON text: tar sidecar or Parquet pass-through columns
]

_RUN_FIELDS = [
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("prompt_version", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
]

RESULTS_SCHEMA = pa.schema(
    _ITEM_FIELDS
    + [
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("task", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("thought", pa.string()),  # the model's thought channel (thinking mode); never part of text
        pa.field("detections", pa.list_(DETECTION_TYPE)),  # boxes tasks
        pa.field("data", pa.string()),  # json tasks: the document, valid against the task's schema, as JSON text
        pa.field("blocks", pa.list_(BLOCK_TYPE)),  # layout tasks: the page's blocks in reading order
        pa.field("finish_reason", pa.string()),
        pa.field("truncated", pa.bool_()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("generated_tokens", pa.int32()),
        pa.field("cached_tokens", pa.int32()),
        # Prompt tokens shared with the first task of its prefix group (same image and budget): cached_tokens
        # near it means the task took the image from the prefix cache; 0 for a group's first task.
        pa.field("shared_prefix_tokens", pa.int32()),
        pa.field("latency_ms", pa.float64()),
        pa.field("attempts", pa.int32()),
        pa.field("instruction", pa.string()),  # as sent: the task's instruction with the item's values filled in
        pa.field("task_fingerprint", pa.string()),  # task definition + item values: part of incremental-run keys
        pa.field("text_source", pa.string()),  # model, or text_layer: the PDF page's own text, no engine request
        pa.field("text_layer_verdict", pa.string()),  # PDF pages: trusted, partial, garbled, ocr_layer or none
        pa.field("text_layer_cer", pa.float64()),  # the model's answer against the page's text layer (agreement)
        pa.field("rotation", pa.int32()),  # clockwise degrees the page was turned upright before the model saw it
        # Why to look at the answer (tasks/quality.py): truncated, looped, empty, retried, blank, rotated; [] when none.
        pa.field("quality_flags", pa.list_(pa.string())),
        pa.field("confidence", pa.float32()),  # geometric-mean probability of the answer's tokens, 0-1
        pa.field("language", pa.string()),  # ISO 639-1 of a text answer; null when too short to tell
        # json answers: each top-level field's value and the geometric-mean probability of its tokens
        pa.field("field_confidence", pa.list_(FIELD_CONFIDENCE_TYPE)),
    ]
    + _RUN_FIELDS
)

ERRORS_SCHEMA = pa.schema(
    _ITEM_FIELDS
    + [
        pa.field("task", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string()),
        pa.field("raw_output", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("instruction", pa.string()),
        pa.field("task_fingerprint", pa.string()),
    ]
    + _RUN_FIELDS
)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _item_columns(ref: ItemRef, content_hash: Optional[str], metadata: Optional[str]) -> dict[str, Any]:
    return {
        "item_id": ref.item_id,
        "source_uri": ref.source_uri,
        "page": ref.page,
        "member": ref.member,
        "content_hash": content_hash,
        "metadata": metadata,
    }


def _run_columns(run: RunInfo) -> dict[str, Any]:
    return {
        "model_id": run.model_id,
        "prompt_version": run.prompt_version,
        "run_id": run.run_id,
        "created_at": _now(),
    }


def _frames(box_1000: Optional[Sequence[Any]], box_norm: Optional[Sequence[Any]], box_px: Optional[Sequence[Any]]) -> dict[str, Any]:
    def as_box(values: Optional[Sequence[Any]]) -> Optional[dict[str, Any]]:
        return None if values is None else dict(zip(("ymin", "xmin", "ymax", "xmax"), values))

    return {"box_1000": as_box(box_1000), "box": as_box(box_norm), "box_px": as_box(box_px)}


def _detection_row(d: Detection) -> dict[str, Any]:
    return {"label": d.label, **_frames(d.box_1000, d.box_norm, d.box_px)}


def _block_row(b: Block) -> dict[str, Any]:
    return {"index": b.index, "category": b.category, "text": b.text, **_frames(b.box_1000, b.box_norm, b.box_px)}


def result_row(completion: TaskCompletion, run: RunInfo, parsed: ParsedAnswer) -> dict[str, Any]:
    """A results-table row: the completion's provenance and tokens, the answer's typed columns."""
    info = completion.info
    row = _item_columns(info.ref, info.content_hash, info.metadata)
    row.update(
        width=info.width,
        height=info.height,
        task=completion.task,
        text=parsed.text,
        thought=completion.thought,
        detections=None if parsed.detections is None else [_detection_row(d) for d in parsed.detections],
        data=parsed.data,
        blocks=None if parsed.blocks is None else [_block_row(b) for b in parsed.blocks],
        finish_reason=completion.finish_reason,
        truncated=completion.finish_reason == "length",
        prompt_tokens=completion.prompt_tokens,
        generated_tokens=completion.generated_tokens,
        cached_tokens=completion.cached_tokens,
        shared_prefix_tokens=completion.shared_prefix_tokens,
        latency_ms=round(completion.latency_s * 1000.0, 3),
        attempts=completion.attempts,
        instruction=completion.instruction,
        task_fingerprint=completion.task_fingerprint,
        text_source=completion.text_source,
        text_layer_verdict=None if info.layer is None else info.layer.verdict,
        text_layer_cer=None if completion.layer_cer is None else round(completion.layer_cer, 6),
        rotation=info.rotation,
        quality_flags=list(info.quality_flags) + list(completion.quality_flags),
        confidence=completion.confidence,
        language=completion.language,
        field_confidence=None if completion.field_confidence is None else [
            {"field": key, "confidence": value} for key, value in completion.field_confidence
        ],
    )
    row.update(_run_columns(run))
    return row


def error_row(error: ErrorRecord, run: RunInfo) -> dict[str, Any]:
    row = _item_columns(error.ref, error.content_hash, error.metadata)
    row.update(
        task=error.task,
        stage=error.stage.value,
        error_type=error.error_type,
        message=error.message,
        raw_output=error.raw_output,
        attempts=error.attempts,
        instruction=error.instruction,
        task_fingerprint=error.task_fingerprint,
    )
    row.update(_run_columns(run))
    return row
