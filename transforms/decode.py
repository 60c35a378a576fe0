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
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import apache_beam as beam
from apache_beam import pvalue
from PIL import Image
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from library import metrics
from library.errors import ERRORS_TAG, failure
from library.metadata import merge
from library.page_checks import check_page, require_osd
from schemas.records import DecodeUnit, ImageItem, ItemInfo, ItemRef, LayerAnswers, SkippedItem, SourceFile, Stage, UnitKind
from library.formats import (
    DecodeLimits,
    EmptyFile,
    EmptyShard,
    FileTooLarge,
    Format,
    MissingImage,
    fit,
    page_count,
    read_bytes,
    read_head,
    render_item,
    sniff,
)
from library.shards import ShardSettings, SpecialMember, TruncatedShard, iter_tar_samples, parquet_row_groups
from library.text_layer import PageLayer
from library.units import ItemFailure, UnitItem, unit_items
from tasks.task import Task
from tasks.text_layer import TextLayerSettings
from transforms.text_layer import PagePlan, layer_completion, page_layers, plan_page

SKIPPED_TAG = "skipped"  # items every task of which an earlier run answered (incremental runs)
LAYER_TAG = "text_layer"  # PDF pages' tasks answered from their text layers (LayerAnswers), no engine request


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
    """DecodeUnit -> ImageItem per item, with its tasks still to run; an item that fails -> ErrorRecord for it only.

    The unit's items come from `library.units.unit_items`, the walk the
    incremental hash pass shares. An item whose every task an earlier run
    answered (the unit's `answered`, empty unless an incremental run set it)
    goes to the `skipped` output before its pixels are decoded or rendered.
    """

    def __init__(
        self, limits: DecodeLimits, shards: ShardSettings, tasks: Sequence[Task] = (),
        text_layer: TextLayerSettings = TextLayerSettings(mode="model"),
    ):
        self._limits = limits
        self._shards = shards
        self._definitions = {task.name: task for task in tasks}
        self._tasks = tuple(self._definitions)  # the run's tasks; empty: items carry no task list and the engine runs all
        self._text_layer = text_layer

    def setup(self) -> None:
        if self._limits.upright_pages:
            require_osd()  # a worker without Tesseract's OSD fails here, naming the package, not page by page

    def process(self, unit: DecodeUnit) -> Iterator[object]:
        answered = dict(unit.answered)
        entries = list(unit_items(unit, self._limits, self._shards))  # a document's pages share its bytes
        layers = page_layers(entries)  # PDF pages' text layers, read before anything is rendered
        for entry in entries:
            if isinstance(entry, ItemFailure):
                yield self._failure(entry)
            elif entry.ref.item_id in layers:
                yield from self._page(entry, answered.get(entry.ref.item_id, ()), layers[entry.ref.item_id])
            else:
                yield self._decoded(entry, answered.get(entry.ref.item_id, ()))

    @staticmethod
    def _failure(failed: ItemFailure) -> pvalue.TaggedOutput:
        return failure(failed.ref, Stage.DECODE, failed.error, content_hash=failed.content_hash, metadata=failed.metadata)

    def _decoded(
        self, item: UnitItem, done: tuple[str, ...], page: Optional[PagePlan] = None,
    ) -> Union[ImageItem, pvalue.TaggedOutput]:
        """One item -> ImageItem with the tasks not in `done`, SkippedItem, or ErrorRecord.

        `page`: a PDF page's plan (`_page`): its tasks for the engine, and its layer in the item's info.
        """
        remaining = tuple(task for task in self._tasks if task not in done)
        if done and not remaining:
            metrics.count("skipped_items")
            metrics.count("skipped_tasks", len(self._tasks))
            return pvalue.TaggedOutput(SKIPPED_TAG, SkippedItem(ref=item.ref, content_hash=item.content_hash, tasks=self._tasks))
        try:
            image = render_item(item.data, item.fmt, item.ref.page, self._limits)
            info = ItemInfo(ref=item.ref, width=image.width, height=image.height, content_hash=item.content_hash, metadata=item.metadata)
            image, info = self._checked(item, image, info)
        except Exception as exc:  # noqa: BLE001
            return self._failure(item.failed(exc))
        metrics.count("items")
        if item.ref.page is not None:
            metrics.count("pages")
        if len(remaining) < len(self._tasks):
            metrics.count("skipped_tasks", len(self._tasks) - len(remaining))
        if page is None:
            return ImageItem(info=info, image=fit(image, self._limits.max_side), tasks=remaining)
        info = dataclasses.replace(info, layer=page.info.layer)
        return ImageItem(info=info, image=fit(image, self._limits.max_side), tasks=page.to_engine, anchored=page.anchored)

    def _page(self, item: UnitItem, done: tuple[str, ...], layer: PageLayer) -> Iterator[object]:
        """A PDF page: the tasks its text layer answers (never rendered for), then the rest as `_decoded`."""
        remaining = [self._definitions[task] for task in self._tasks if task not in done]
        page = plan_page(item, layer, remaining, self._text_layer, self._limits)
        rendered = self._decoded(item, done, page) if page.to_engine or not page.from_layer else None
        if isinstance(rendered, pvalue.TaggedOutput) and rendered.tag == ERRORS_TAG:
            yield rendered  # a page that does not render is one error for all its tasks, the layer's too
            return
        if page.from_layer:
            yield pvalue.TaggedOutput(LAYER_TAG, LayerAnswers(
                tuple(layer_completion(page.info, task) for task in page.from_layer), to_engine=rendered is not None
            ))
            metrics.count("tasks_from_text_layer", len(page.from_layer))
            metrics.count("tasks_done", len(page.from_layer))
        if rendered is not None:
            yield rendered
            return
        # Answered without the engine: never rendered.
        metrics.count("items")
        metrics.count("pages")
        metrics.count("pages_not_rendered")
        if done:
            metrics.count("skipped_tasks", len(done))

    def _checked(self, item: UnitItem, image: Image.Image, info: ItemInfo) -> tuple[Image.Image, ItemInfo]:
        """The page checks (`library.page_checks`): a blank page marked, a turned one upright; `info` keeps the source's size."""
        image, found = check_page(image, item.fmt, item.data, self._limits.skip_blank_pages, self._limits.upright_pages)
        if found.blank:
            metrics.count("blank_pages")
        if found.rotation:
            metrics.count("rotated_pages")
        return image, dataclasses.replace(info, rotation=found.rotation, blank=found.blank)
