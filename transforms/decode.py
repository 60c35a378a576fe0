"""Decode stage: source files -> page ranges -> RGB images with known identity and size.

Two steps with a reshuffle between them (wired in `pipelines.vision_batch`):
`PlanUnits` sniffs each file and cuts paged sources into page ranges;
`DecodeUnits` renders/decodes one range. A long PDF therefore spreads over
many workers instead of one worker rendering 2,000 pages while others idle.

Every failure of an input becomes an ErrorRecord for the file or page it
concerns; no exception escapes to fail the bundle for the other items. The
exception is storage that stays down past its retry budget
(`storage.StorageFailure`): not the input's fault, so it fails the bundle.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from library import metrics
from library.errors import failure
from library.metadata import merge
from schemas.records import DecodeUnit, ImageItem, ItemInfo, ItemRef, SkippedItem, SourceFile, Stage, UnitKind
from library.formats import (
    HEAD_BYTES,
    DecodeError,
    DecodeLimits,
    EmptyFile,
    EmptyShard,
    FileTooLarge,
    Format,
    MissingImage,
    fit,
    is_paged,
    page_count,
    read_bytes,
    read_head,
    render_item,
    sniff,
)
from library.shards import ShardSettings, SpecialMember, TruncatedShard, iter_parquet_rows, iter_tar_samples, parquet_row_groups

SKIPPED_TAG = "skipped"  # items every task of which an earlier run answered (incremental runs)


def plan_file_units(source: SourceFile, fmt: Format, load: Callable[[], bytes], limits: DecodeLimits) -> list[DecodeUnit]:
    """Cut an image or document file into DecodeUnits of at most `pages_per_unit` pages.

    Only paged formats are read whole here (to count pages); a plain image
    costs no read beyond the sniffed head.
    """
    if not fmt.has_pages:
        return [DecodeUnit(uri=source.uri, kind=UnitKind.IMAGE, first_page=0, end_page=1, page_count=1, metadata=source.metadata)]
    pages = page_count(load(), fmt, limits)
    kind = UnitKind.PDF if fmt is Format.PDF else UnitKind.IMAGE
    step = max(1, limits.pages_per_unit)
    return [
        DecodeUnit(
            uri=source.uri, kind=kind, first_page=start, end_page=min(pages, start + step), page_count=pages,
            metadata=source.metadata,
        )
        for start in range(0, pages, step)
    ]


def item_hash(source_sha256: str, page: Optional[int]) -> str:
    """Content hash of one item: its source's own hash, or source hash + page for pages."""
    if page is None:
        return source_sha256
    return hashlib.sha256(f"{source_sha256}#page={page}".encode()).hexdigest()


class PlanUnits(beam.DoFn):
    """SourceFile -> DecodeUnits (page ranges, row groups, tar members); refused files -> ErrorRecord."""

    def __init__(self, limits: DecodeLimits, shards: ShardSettings, max_items: Optional[int] = None):
        self._limits = limits
        self._shards = shards
        self._max_items = max_items  # --limit: a tar shard is streamed no further than this

    def process(self, source: SourceFile) -> Iterator[object]:
        try:
            head = read_head(source.uri)
            if not head:
                raise EmptyFile("file is empty")
            fmt = sniff(head)
            # Shards are streamed or read by row group, so the whole-file size limit applies to other files only.
            if fmt is Format.TAR:
                yield from self._tar_members(source)
                return
            if fmt is Format.PARQUET:
                units = self._parquet_units(source)
            elif source.size_bytes > self._limits.max_file_bytes:
                raise FileTooLarge(
                    f"file is {source.size_bytes} bytes, over the max_file_bytes limit of {self._limits.max_file_bytes}"
                )
            else:
                units = plan_file_units(source, fmt, lambda: read_bytes(source.uri, self._limits.max_file_bytes), self._limits)
        except Exception as exc:  # noqa: BLE001 - any failure of one file becomes its error row
            yield failure(ItemRef.make(source.uri), Stage.PLAN, exc)
            return
        metrics.count("decode_units", len(units))
        metrics.count("items_planned", sum(unit.end_page - unit.first_page for unit in units if unit.kind is not UnitKind.PARQUET))
        yield from units

    def _parquet_units(self, source: SourceFile) -> list[DecodeUnit]:
        with FileSystems.open(source.uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            rows = parquet_row_groups(handle, self._shards)
        metrics.count("shards")
        metrics.count("items_planned", sum(rows))
        return [
            DecodeUnit(
                uri=source.uri, kind=UnitKind.PARQUET, first_page=g, end_page=g + 1, page_count=len(rows),
                metadata=source.metadata, rows=count,
            )
            for g, count in enumerate(rows)
        ]

    def _tar_members(self, source: SourceFile) -> Iterator[object]:
        metrics.count("shards")
        samples = 0
        with FileSystems.open(source.uri, compression_type=CompressionTypes.UNCOMPRESSED) as stream:
            try:
                for sample in iter_tar_samples(stream, self._limits.max_file_bytes):
                    if self._max_items is not None and samples >= self._max_items:
                        break
                    samples += 1  # a link member too: it is one outcome (an error row), as an imageless sample is
                    if isinstance(sample, SpecialMember):
                        # Named by the whole member name: its key may also be a sample's, with results of its own.
                        yield failure(ItemRef.make(source.uri, member=sample.name), Stage.PLAN, sample.refusal(),
                                      metadata=source.metadata)
                        continue
                    sample_metadata = merge(source.metadata, sample.metadata)
                    if sample.image is None:
                        yield failure(
                            ItemRef.make(source.uri, member=sample.key),
                            Stage.PLAN,
                            MissingImage(
                                f"sample has no image member (members: {', '.join(sample.member_names)}; "
                                f"images over max_file_bytes are not read)"
                            ),
                            metadata=sample_metadata,
                        )
                        continue
                    metrics.count("decode_units")
                    metrics.count("items_planned")
                    yield DecodeUnit(
                        uri=source.uri, kind=UnitKind.MEMBER, first_page=0, end_page=1, page_count=1,
                        member=sample.key, payload=sample.image, metadata=sample_metadata,
                    )
            except TruncatedShard as exc:
                yield failure(ItemRef.make(source.uri), Stage.PLAN, exc)
                return
        if not samples:
            yield failure(ItemRef.make(source.uri), Stage.PLAN, EmptyShard("tar shard holds no files"))


def first_items(units: Iterable[DecodeUnit], limit: int) -> list[DecodeUnit]:
    """The units holding the first `limit` planned items in input order, the last one cut to its share."""
    kept, remaining = [], limit
    for unit in sorted(units, key=lambda u: (u.uri, u.first_page, u.member or "")):
        if remaining <= 0:
            break
        share = min(unit.planned_items, remaining)
        if share > 0:
            kept.append(dataclasses.replace(unit, max_items=share))
            remaining -= share
    return kept


class LimitUnits(beam.PTransform):
    """`--limit N`: only the units of the first N planned items go on to be decoded.

    Sees at most N files (the sources stage keeps the first N) with at most N
    tar members each, so gathering their units in one place stays small.
    """

    def __init__(self, limit: int):
        super().__init__()
        self._limit = limit

    def expand(self, units: beam.PCollection) -> beam.PCollection:
        limit = self._limit
        return (
            units
            | "OneKey" >> beam.Map(lambda unit: (None, unit))
            | "AllUnits" >> beam.GroupByKey()
            | "FirstItems" >> beam.FlatMap(lambda keyed: _kept_and_counted(keyed[1], limit))
        )


def _kept_and_counted(units: Iterable[DecodeUnit], limit: int) -> list[DecodeUnit]:
    units = list(units)
    kept = first_items(units, limit)
    # The progress line's "of N planned" counts what will be decoded, not what the files hold.
    metrics.count("items_planned", sum(u.max_items or 0 for u in kept) - sum(u.planned_items for u in units))
    return kept


class DecodeUnits(beam.DoFn):
    """DecodeUnit -> ImageItem per page, with its tasks still to run; a page, member or row that fails -> ErrorRecord for it only.

    An item whose every task an earlier run answered (`DecodeUnit.answered`, set
    by `transforms.incremental`) goes to the `skipped` output before its pixels
    are decoded or rendered. `_item` and `_failed` are the two hooks
    `transforms.incremental.HashUnits` overrides to hash items without decoding them.
    """

    def __init__(self, limits: DecodeLimits, shards: ShardSettings, tasks: Sequence[str] = ()):
        self._limits = limits
        self._shards = shards
        self._tasks = tuple(tasks)  # the run's tasks; empty: items carry no task list and the engine runs all

    def process(self, unit: DecodeUnit) -> Iterator[object]:
        answered = dict(unit.answered)
        if unit.kind is UnitKind.MEMBER:
            outputs = self._payload_items(unit.payload or b"", unit.uri, unit.member, unit.metadata, answered)
        elif unit.kind is UnitKind.PARQUET:
            outputs = self._parquet_items(unit, answered)
        else:
            outputs = self._file_items(unit, answered)
        # Each output is one item: decoded, skipped or its error row; --limit stops the unit after its share.
        yield from itertools.islice(outputs, unit.max_items)

    def _failed(self, ref: ItemRef, exc: BaseException, **kwargs: object) -> Iterator[object]:
        """Hook: the error row of an item, or of a whole unit when none of it could be read."""
        yield failure(ref, Stage.DECODE, exc, **kwargs)

    def _file_items(self, unit: DecodeUnit, answered: Mapping[str, tuple[str, ...]]) -> Iterator[object]:
        pages = range(unit.first_page, unit.end_page)
        try:
            data = read_bytes(unit.uri, self._limits.max_file_bytes)
        except Exception as exc:  # noqa: BLE001
            for page in pages:
                yield from self._failed(ItemRef.make(unit.uri, page=page if unit.is_paged else None), exc, metadata=unit.metadata)
            return
        fmt = Format.PDF if unit.kind is UnitKind.PDF else Format.IMAGE
        yield from self._items(data, fmt, unit.uri, None, unit.metadata, pages if unit.is_paged else None, answered)

    def _payload_items(
        self, data: bytes, uri: str, member: Optional[str], metadata: Optional[str], answered: Mapping[str, tuple[str, ...]]
    ) -> Iterator[object]:
        """All pages of an in-memory payload (tar member or Parquet cell)."""
        fmt = sniff(data[:HEAD_BYTES])
        pages = None
        if fmt.has_pages:
            try:
                count = page_count(data, fmt, self._limits)
            except Exception as exc:  # noqa: BLE001
                yield from self._failed(ItemRef.make(uri, member=member), exc, metadata=metadata,
                                        content_hash=hashlib.sha256(data).hexdigest())
                return
            pages = range(count) if is_paged(fmt, count) else None
        yield from self._items(data, fmt, uri, member, metadata, pages, answered)

    def _parquet_items(self, unit: DecodeUnit, answered: Mapping[str, tuple[str, ...]]) -> Iterator[object]:
        try:
            with FileSystems.open(unit.uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                rows = list(iter_parquet_rows(handle, unit.first_page, self._shards))
        except Exception as exc:  # noqa: BLE001
            yield from self._failed(ItemRef.make(unit.uri), DecodeError(f"row group {unit.first_page}: {exc}"))
            return
        for row in rows:
            row_metadata = merge(unit.metadata, row.metadata)
            if not row.image:
                yield from self._failed(ItemRef.make(unit.uri, member=row.member),
                                        MissingImage(f"column {self._shards.parquet_bytes_column!r} is null or empty"),
                                        metadata=row_metadata)
                continue
            yield from self._payload_items(row.image, unit.uri, row.member, row_metadata, answered)

    def _items(
        self, data: bytes, fmt: Format, uri: str, member: Optional[str], metadata: Optional[str], pages: Optional[range],
        answered: Mapping[str, tuple[str, ...]],
    ) -> Iterator[object]:
        source_sha256 = hashlib.sha256(data).hexdigest()
        for page in pages if pages is not None else [None]:
            ref = ItemRef.make(uri, page=page, member=member)
            yield from self._item(data, fmt, ref, item_hash(source_sha256, page), metadata, answered.get(ref.item_id, ()))

    def _item(
        self, data: bytes, fmt: Format, ref: ItemRef, content_hash: str, metadata: Optional[str], done: tuple[str, ...]
    ) -> Iterator[object]:
        """Hook: one item of `data` -> ImageItem with the tasks not in `done`, SkippedItem, or ErrorRecord."""
        remaining = tuple(task for task in self._tasks if task not in done)
        if done and not remaining:
            metrics.count("skipped_items")
            metrics.count("skipped_tasks", len(self._tasks))
            yield pvalue.TaggedOutput(SKIPPED_TAG, SkippedItem(ref=ref, content_hash=content_hash, tasks=self._tasks))
            return
        try:
            image = render_item(data, fmt, ref.page, self._limits)
        except Exception as exc:  # noqa: BLE001
            yield from self._failed(ref, exc, content_hash=content_hash, metadata=metadata)
            return
        metrics.count("items")
        if ref.page is not None:
            metrics.count("pages")
        if len(remaining) < len(self._tasks):
            metrics.count("skipped_tasks", len(self._tasks) - len(remaining))
        info = ItemInfo(ref=ref, width=image.width, height=image.height, content_hash=content_hash, metadata=metadata)
        yield ImageItem(info=info, image=fit(image, self._limits.max_side), tasks=remaining)
