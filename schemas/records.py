"""Typed records that cross stage boundaries.

Each stage of the pipeline (sources -> decode -> prompts -> engine -> parse ->
sinks) consumes and produces one of these, so a stage can be read, tested and
replaced on its own. Rows written to Parquet are built from them in
`schemas.tables`; nothing else defines row layout.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from PIL import Image

from schemas.uris import canonical_uri, mask_credentials


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One matched input object (local path or gs:// URI)."""

    uri: str
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class DecodeUnit:
    """A slice of a source that one worker decodes.

    Multi-page sources (PDF, multi-frame TIFF) are cut into page ranges and
    Parquet shards into row-group ranges, so a 2,000-page PDF fans out over
    many workers after a reshuffle instead of being decoded by one worker
    serially. Tar members travel as `payload` bytes: a tar can only be read
    front to back, so its reader streams members out to other workers.
    """

    uri: str
    kind: str  # "image" | "pdf" (page range of a file) | "parquet" (row groups) | "member" (payload bytes)
    first_page: int  # 0-based, inclusive (row group for "parquet")
    end_page: int  # 0-based, exclusive
    page_count: int  # pages in the whole source; 1 for single-frame images
    member: Optional[str] = None  # shard member key ("member" units)
    payload: Optional[bytes] = None  # the member's bytes ("member" units)
    metadata: Optional[str] = None  # JSON carried to the rows (tar sidecars)
    rows: int = 0  # "parquet" units: rows in the row group (from the footer, at planning)
    max_items: Optional[int] = None  # --limit: decode at most this many items of the unit

    @property
    def is_paged(self) -> bool:
        return self.page_count > 1 or self.kind == "pdf"

    @property
    def planned_items(self) -> int:
        """Items the unit holds as far as planning knows (a member or row holding a document counts once)."""
        if self.kind == "parquet":
            return self.rows
        if self.kind == "member":
            return 1
        return self.end_page - self.first_page


@dataclasses.dataclass(frozen=True)
class ItemRef:
    """Identity of one image the model looks at: a file, a page, or a shard member.

    `item_id` is stable across runs (derived from URI, page and member only)
    so results of different runs join on it. `make` writes the source in its
    canonical spelling (`schemas.uris`: absolute, normalised local paths,
    URIs without credentials), so the id of a file does not depend on the
    working directory or the spelling it was reached by, in the pipeline's
    rows and in references built or written by hand alike.
    """

    item_id: str
    source_uri: str
    page: Optional[int] = None  # 0-based page/frame index for paged sources
    member: Optional[str] = None  # shard member key (tar/Parquet shards)

    @staticmethod
    def make(source_uri: str, page: Optional[int] = None, member: Optional[str] = None) -> "ItemRef":
        source_uri = canonical_uri(source_uri)
        item_id = source_uri
        if member is not None:
            item_id += f"#member={member}"
        if page is not None:
            item_id += f"#page={page}"
        return ItemRef(item_id=item_id, source_uri=source_uri, page=page, member=member)


@dataclasses.dataclass(frozen=True)
class ItemInfo:
    """What is known about a decoded item, without its pixels."""

    ref: ItemRef
    width: int  # pixels of the source image after EXIF orientation (or rendered page)
    height: int
    content_hash: str  # sha256 hex of the item's own bytes (file or member, + page for pages)
    metadata: Optional[str] = None  # JSON from the shard (tar sidecar, Parquet pass-through columns)


@dataclasses.dataclass
class ImageItem:
    """A decoded RGB image ready for the engine."""

    info: ItemInfo
    image: Image.Image  # RGB; possibly downscaled from info.width x info.height
    tasks: tuple[str, ...] = ()  # tasks still to run (set by the incremental stage)


@dataclasses.dataclass(frozen=True)
class TaskCompletion:
    """The engine's answer for one (item, task) request."""

    info: ItemInfo
    task: str
    text: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    latency_s: float  # from submission to the engine until the request finished
    attempts: int = 1  # requests made for this task (1 + retry rungs used)


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
    """Why an item (or one task of it) produced no result.

    Every input ends in a result row or in one of these: `stage` says where it
    stopped, `error_type`/`message` say why, `raw_output` keeps model text that
    failed validation so it can be inspected.
    """

    ref: ItemRef
    stage: str  # match | plan | decode | engine | parse
    error_type: str
    message: str
    task: Optional[str] = None
    content_hash: Optional[str] = None
    raw_output: Optional[str] = None
    metadata: Optional[str] = None
    attempts: Optional[int] = None  # engine requests made for the task, when it reached the engine

    @staticmethod
    def from_exception(ref: ItemRef, stage: str, exc: BaseException, **kwargs: Any) -> "ErrorRecord":
        # Exception texts often quote the location they failed on: never with its credentials.
        message = mask_credentials(str(exc) or repr(exc))
        return ErrorRecord(ref=ref, stage=stage, error_type=type(exc).__name__, message=message[:2000], **kwargs)


@dataclasses.dataclass(frozen=True)
class Detection:
    """One box, in the three frames users ask for."""

    label: str
    box_1000: tuple[int, int, int, int]  # ymin, xmin, ymax, xmax as the model emits, 0-1000
    box_norm: tuple[float, float, float, float]  # ymin, xmin, ymax, xmax in 0-1
    box_px: tuple[int, int, int, int]  # ymin, xmin, ymax, xmax in source-image pixels


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """Per-run constants written to every row."""

    run_id: str
    model_id: str
    prompt_version: str
