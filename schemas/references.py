"""The reference-set format the evaluator scores results against.

One row per item, keyed like a results row (`source_uri`, `page`, `member`
-> the same `item_id` the pipeline computes with `ItemRef.make`), holding
whichever references exist for it: a transcription (scores `ocr` and
`markdown`), labelled boxes, captions, and the expected answers of other
tasks (`answers`: your own tasks' questions and JSON extractions). A null
field means "no reference for that task" and the task is
not scored for the item; an empty box list means "nothing to detect here",
which is scored. Boxes are 0-1 fractions of the item's width/height,
`ymin, xmin, ymax, xmax` as in the results' `detections[].box`, so
references survive a change of `--pdf_dpi` or `--max_image_side`.

Stored as Parquet (`REFERENCES_SCHEMA`) or JSON Lines with the same field
names; docs/evaluation.md documents both. Rows are built and read only here.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Optional

import pyarrow as pa

from schemas.records import ItemRef

BOX_KEYS = ("ymin", "xmin", "ymax", "xmax")
TEXT_REGION_LABEL = "text"  # label of the text boxes the reference builders write
GRANULARITIES = ("line", "word")  # what one text box of a built reference covers

REFERENCE_BOX_TYPE = pa.struct(
    [
        ("label", pa.string()),
        ("box", pa.struct([(key, pa.float32()) for key in BOX_KEYS])),  # 0-1 fractions of width/height
        ("text", pa.string()),  # the words inside a text box, when known (helps reading a report)
    ]
)

REFERENCES_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("page", pa.int32()),
        pa.field("member", pa.string()),
        pa.field("width", pa.int32()),  # pixels of the item as the pipeline decodes it, when known
        pa.field("height", pa.int32()),
        pa.field("text", pa.string()),  # reference transcription; null: OCR not scored for the item
        pa.field("boxes", pa.list_(REFERENCE_BOX_TYPE)),  # null: detection not scored; []: nothing to detect
        pa.field("captions", pa.list_(pa.string())),  # one or more acceptable captions; null: not scored
        # JSON object {task: expected answer}: a string for text tasks, a JSON document for json tasks.
        pa.field("answers", pa.string()),
        pa.field("origin", pa.string()),  # how the reference was made: pdf-text-layer, render-text, manual, ...
    ]
)


class InvalidReference(ValueError):
    """A reference row that cannot be scored against (bad key, box or type)."""


@dataclasses.dataclass(frozen=True)
class ReferenceBox:
    """One labelled box in the 0-1 frame: (ymin, xmin, ymax, xmax)."""

    label: str
    box: tuple[float, float, float, float]
    text: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class ReferenceItem:
    """Everything known to be true about one item; None marks a task without a reference."""

    ref: ItemRef
    width: Optional[int] = None
    height: Optional[int] = None
    text: Optional[str] = None
    boxes: Optional[tuple[ReferenceBox, ...]] = None
    captions: Optional[tuple[str, ...]] = None
    answers: Optional[Mapping[str, Any]] = None  # task -> expected answer (text, or a JSON document)
    origin: Optional[str] = None


def _checked_box(box: Any, where: str) -> tuple[float, float, float, float]:
    """{ymin, xmin, ymax, xmax} or a list of four, as 0-1 floats with min < max, else InvalidReference."""
    if isinstance(box, Mapping):
        missing = [key for key in BOX_KEYS if key not in box]
        if missing:
            raise InvalidReference(f"{where}: box lacks {missing}")
        box = [box[key] for key in BOX_KEYS]
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise InvalidReference(f"{where}: box {box!r} is not four numbers") from None
    if len(values) != 4 or not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in values):
        raise InvalidReference(f"{where}: box {box!r} is not four 0-1 fractions (ymin, xmin, ymax, xmax)")
    ymin, xmin, ymax, xmax = (min(1.0, max(0.0, v)) for v in values)
    if not (ymin < ymax and xmin < xmax):
        raise InvalidReference(f"{where}: box {box!r} has no area (needs ymin < ymax and xmin < xmax)")
    return ymin, xmin, ymax, xmax


def reference_row(item: ReferenceItem) -> dict[str, Any]:
    """A row of REFERENCES_SCHEMA (Parquet) or a JSON Lines object: the same dict."""
    boxes = None
    if item.boxes is not None:
        boxes = [{"label": b.label, "box": dict(zip(BOX_KEYS, b.box)), "text": b.text} for b in item.boxes]
    return {
        "item_id": item.ref.item_id,
        "source_uri": item.ref.source_uri,
        "page": item.ref.page,
        "member": item.ref.member,
        "width": item.width,
        "height": item.height,
        "text": item.text,
        "boxes": boxes,
        "captions": None if item.captions is None else list(item.captions),
        "answers": None if item.answers is None else json.dumps(item.answers, ensure_ascii=False, sort_keys=True),
        "origin": item.origin,
    }


def reference_from_row(row: Mapping[str, Any]) -> ReferenceItem:
    """Validate one Parquet row or JSON Lines object (hand-written ones included).

    `item_id` is derived from source_uri/page/member, so hand-written JSON
    Lines may omit it; when present it must agree, because a mismatch would
    silently score nothing.
    """
    source_uri = row.get("source_uri")
    if not isinstance(source_uri, str) or not source_uri:
        raise InvalidReference(f"reference row without a source_uri: {dict(row)!r:.200}")
    page = row.get("page")
    ref = ItemRef.make(source_uri, page=None if page is None else int(page), member=row.get("member"))
    given_id = row.get("item_id")
    if given_id is not None and given_id != ref.item_id:
        raise InvalidReference(f"item_id {given_id!r} disagrees with source_uri/page/member (expected {ref.item_id!r})")
    boxes = None
    if row.get("boxes") is not None:
        boxes = tuple(
            ReferenceBox(
                label=str(entry.get("label") or ""),
                box=_checked_box(entry.get("box"), f"{ref.item_id} box {i}"),
                text=entry.get("text"),
            )
            for i, entry in enumerate(row["boxes"])
        )
    captions = row.get("captions")
    if isinstance(captions, str):
        raise InvalidReference(f"{ref.item_id}: captions must be a list of strings")
    answers = row.get("answers")
    if isinstance(answers, str):  # Parquet holds the object as JSON text; JSON Lines as an object
        try:
            answers = json.loads(answers)
        except json.JSONDecodeError:
            raise InvalidReference(f"{ref.item_id}: answers is not JSON") from None
    if answers is not None and not isinstance(answers, dict):
        raise InvalidReference(f"{ref.item_id}: answers must be an object of task -> expected answer")
    return ReferenceItem(
        ref=ref,
        width=row.get("width"),
        height=row.get("height"),
        text=row.get("text"),
        boxes=boxes,
        captions=None if captions is None else tuple(str(c) for c in captions),
        answers=answers,
        origin=row.get("origin"),
    )
