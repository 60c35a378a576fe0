"""Typed records that cross stage boundaries.

Each stage of the pipeline (sources -> decode -> prompts -> engine -> parse ->
sinks) consumes and produces one of these, so a stage can be read, tested and
replaced on its own. Rows written to Parquet are built from them in
`schemas.tables`; nothing else defines row layout.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Optional

from PIL import Image

from schemas.uris import canonical_uri, mask_credentials


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One matched input object (local path or gs:// URI)."""

    uri: str
    size_bytes: int
    metadata: Optional[str] = None  # JSON of the manifest row's other columns (library.metadata)


class UnitKind(enum.Enum):
    """What a DecodeUnit holds, which decides how it is read."""

    IMAGE = "image"  # frames of an image file (one, or a range of a multi-frame TIFF)
    PDF = "pdf"  # a page range of a PDF file
    PARQUET = "parquet"  # one row group of a Parquet shard
    MEMBER = "member"  # one tar sample's image bytes, carried in the unit

    @property
    def in_shard(self) -> bool:
        return self in (UnitKind.PARQUET, UnitKind.MEMBER)


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
    kind: UnitKind
    first_page: int  # 0-based, inclusive (row group for PARQUET)
    end_page: int  # 0-based, exclusive
    page_count: int  # pages in the whole source; 1 for single-frame images
    member: Optional[str] = None  # shard member key (MEMBER units)
    payload: Optional[bytes] = None  # the member's bytes (MEMBER units)
    metadata: Optional[str] = None  # JSON carried to the rows: the source's, with a member's sidecars merged in
    rows: int = 0  # PARQUET units: rows in the row group (from the footer, at planning)
    max_items: Optional[int] = None  # --limit: decode at most this many items of the unit
    # Incremental runs: (item id, tasks earlier runs answered) for this unit's items that have answers;
    # set by transforms.incremental, empty otherwise.
    answered: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def is_paged(self) -> bool:
        return self.page_count > 1 or self.kind is UnitKind.PDF

    @property
    def planned_items(self) -> int:
        """Items the unit holds as far as planning knows (a member or row holding a document counts once)."""
        if self.kind is UnitKind.PARQUET:
            return self.rows
        if self.kind is UnitKind.MEMBER:
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
class PageText:
    """A PDF page's text layer as read before rendering (`library.text_layer`): its verdict and its text."""

    verdict: str  # trusted, partial, garbled, ocr_layer or none (`library.text_layer.Verdict`)
    text: str


@dataclasses.dataclass(frozen=True)
class ItemInfo:
    """What is known about a decoded item, without its pixels."""

    ref: ItemRef
    width: int  # pixels of the source image after EXIF orientation (or rendered page)
    height: int
    content_hash: str  # sha256 hex of the item's own bytes (file or member, + page for pages)
    metadata: Optional[str] = None  # JSON from the shard (tar sidecar, Parquet pass-through columns)
    layer: Optional[PageText] = None  # PDF pages: the text layer, read before rendering
    # Page checks (library.page_checks): clockwise degrees the page was turned to be upright before the
    # model saw it (boxes are mapped back to the source's frame); a blank page is answered without the engine.
    rotation: int = 0
    blank: bool = False

    @property
    def quality_flags(self) -> tuple[str, ...]:
        """The item's own flags for its rows' `quality_flags`: `blank`, `rotated`."""
        return (("blank",) if self.blank else ()) + (("rotated",) if self.rotation else ())


@dataclasses.dataclass(frozen=True)
class SkippedItem:
    """An item whose every task an earlier run answered: counted, never decoded."""

    ref: ItemRef
    content_hash: str
    tasks: tuple[str, ...]  # the answered tasks (all the run's tasks)


@dataclasses.dataclass
class ImageItem:
    """A decoded RGB image ready for the engine."""

    info: ItemInfo
    image: Image.Image  # RGB; possibly downscaled from info.width x info.height
    tasks: tuple[str, ...] = ()  # tasks still to run (DecodeUnits: the run's tasks minus those answered before; empty: all)
    anchored: tuple[str, ...] = ()  # of them, those whose prompt carries the page's text layer (--text_layer anchor)


@dataclasses.dataclass(frozen=True)
class TaskCompletion:
    """The engine's answer for one (item, task) request."""

    info: ItemInfo
    task: str
    text: str  # raw from the engine (special tokens kept); the parse stage replaces it with the answer
    finish_reason: Optional[str]  # vLLM's; None: the engine was not asked (a blank page)
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    latency_s: float  # from submission to the engine until the request finished
    attempts: int = 1  # requests made for this task (1 + retry rungs used; 0 for a blank page)
    thought: Optional[str] = None  # the model's thought channel, split off the answer when it is read (Task.read)
    instruction: Optional[str] = None  # the instruction as sent (placeholders filled), of the last attempt
    task_fingerprint: Optional[str] = None  # the task definition + the item's values (tasks.task)
    # The answer read once (`tasks.task.Task.read`, where the engine stage decides on a retry): its typed
    # columns, or the AnswerError its task's validation raised. Both None: not read yet.
    parsed: Optional["ParsedAnswer"] = None
    parse_error: Optional[Exception] = None
    text_source: str = "model"  # "text_layer": answered from the PDF page's text layer, no engine request
    layer_cer: Optional[float] = None  # the answer's CER against the page's text layer, where both read it
    # How far the answer can be trusted (tasks.quality): its flags (`truncated`, `looped`, `empty`,
    # `retried`; other stages add theirs, e.g. `blank`, `rotated`), the geometric-mean probability of
    # its tokens, and the language of a prose answer (ISO 639-1; None: too short to tell, or not prose).
    quality_flags: tuple[str, ...] = ()
    confidence: Optional[float] = None
    language: Optional[str] = None
    # A json answer's top-level fields, each with the geometric-mean probability of its value's tokens
    # (tasks.quality.field_confidence), in the order written; None for other tasks or when not attributable.
    field_confidence: Optional[tuple[tuple[str, float], ...]] = None

    # Prompt tokens shared with the first task of its prefix group (same image, same budget): what it could take
    # from the prefix cache (engine.api.EngineResult); 0 for the group's first task and a task alone.
    shared_prefix_tokens: int = 0

@dataclasses.dataclass(frozen=True)
class LayerAnswers:
    """A PDF page's tasks answered from its text layer (DecodeUnits); `to_engine`: its other tasks went to the engine."""

    completions: tuple[TaskCompletion, ...]
    to_engine: bool


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
    """An answer as typed output columns (a task's `parse`)."""

    text: str  # the answer, a wrapping code fence removed (layout: the blocks' Markdown)
    detections: Optional[tuple["Detection", ...]] = None  # boxes tasks
    data: Optional[str] = None  # json tasks: the validated document, as compact JSON text
    blocks: Optional[tuple["Block", ...]] = None  # layout tasks


class Stage(enum.Enum):
    """Where an input stopped: the `stage` column of error rows."""

    MATCH = "match"  # an input pattern or manifest entry
    PLAN = "plan"  # a file refused before decoding (size, format, page count, shard structure)
    DECODE = "decode"  # an image or page that could not be decoded
    PROMPT = "prompt"  # a task whose instruction could not be built for the item (a missing value)
    ENGINE = "engine"  # a request the engine rejected
    PARSE = "parse"  # an answer that failed validation

    @property
    def per_task(self) -> bool:
        """Errors of one task of a decoded item (the others stop the whole item)."""
        return self in (Stage.PROMPT, Stage.ENGINE, Stage.PARSE)


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
    """Why an item (or one task of it) produced no result.

    Every input ends in a result row or in one of these: `stage` says where it
    stopped, `error_type`/`message` say why, `raw_output` keeps model text that
    failed validation so it can be inspected.
    """

    ref: ItemRef
    stage: Stage
    error_type: str
    message: str
    task: Optional[str] = None
    content_hash: Optional[str] = None
    raw_output: Optional[str] = None
    metadata: Optional[str] = None
    attempts: Optional[int] = None  # engine requests made for the task, when it reached the engine
    instruction: Optional[str] = None  # the instruction as sent, when the task reached the engine
    task_fingerprint: Optional[str] = None  # of the task and the item's values, for errors of one task

    @staticmethod
    def from_exception(ref: ItemRef, stage: Stage, exc: BaseException, **kwargs: Any) -> "ErrorRecord":
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
class Block:
    """One block of a page's layout; its box in the frames of `Detection`, None when the box has no area."""

    index: int  # reading order, from 0
    category: str  # text, title, list, table, figure, formula, caption, header, footer, footnote
    text: str  # the block's text (tables as Markdown or HTML)
    box_1000: Optional[tuple[int, int, int, int]]
    box_norm: Optional[tuple[float, float, float, float]]
    box_px: Optional[tuple[int, int, int, int]]


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """Per-run constants written to every row."""

    run_id: str
    model_id: str
    prompt_version: str
