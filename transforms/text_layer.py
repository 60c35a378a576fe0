"""Text layers in the decode stage: read each PDF page's layer before rendering, route its tasks, answer from it.

`page_layers` reads the layers of a unit's PDF pages (one PDFium document
per source, `library.text_layer.read_layers`); `plan_page` splits a page's
tasks by their route (`tasks.text_layer.route`) into the answers the layer
gives (`layer_completion`: no engine request, nothing rendered) and the
tasks that still go to the engine, anchored or not. The incremental hash
pass (`transforms.incremental.HashUnits`) asks `task_routes` the same
question, so the keys it builds are those the rows will carry.

A layer that cannot be read is no layer (verdict `none`): rendering the page
meets the same document and reports what is wrong with it, once.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Optional, Sequence

from engine.api import EngineRequest
from library import metrics, storage
from library.formats import DecodeLimits, Format, page_pixels
from library.metadata import ItemValues
from library.text_layer import PageLayer, Verdict, disagreement, read_layers
from library.units import UnitEntry, UnitItem
from schemas.records import ImageItem, ItemInfo, PageText, ParsedAnswer, TaskCompletion
from tasks.task import Task, layer_fingerprint
from tasks.text_layer import MODEL, TEXT_LAYER, TextLayerSettings, anchored_instruction, audited, route

_LOG = logging.getLogger(__name__)


def page_layers(entries: Iterable[UnitEntry]) -> dict[str, PageLayer]:
    """item id -> text layer, for the PDF pages among `entries` (items of one unit, read, not rendered)."""
    pages_by_source: dict[int, list[UnitItem]] = {}
    for entry in entries:
        if isinstance(entry, UnitItem) and entry.fmt is Format.PDF and entry.ref.page is not None:
            pages_by_source.setdefault(id(entry.data), []).append(entry)
    layers: dict[str, PageLayer] = {}
    for items in pages_by_source.values():
        try:
            read = read_layers(items[0].data, [item.ref.page for item in items])
        except Exception as exc:  # noqa: BLE001 - no layer; rendering reports a broken document once
            storage.raise_if_outage(exc)
            _LOG.debug("text layer of %s not read: %s", items[0].ref.source_uri, exc)
            metrics.count("text_layer_unreadable", len(items))
            continue
        layers.update((item.ref.item_id, layer) for item, layer in zip(items, read))
    for layer in layers.values():
        metrics.count(f"text_layer_{layer.verdict.value}")
    return layers


def task_routes(
    settings: TextLayerSettings, tasks: Sequence[Task], layer: Optional[PageLayer], content_hash: str
) -> dict[str, str]:
    """task name -> route (`tasks.text_layer`) for one item (`layer`: None when it is no PDF page)."""
    verdict = None if layer is None else layer.verdict.value
    in_sample = audited(content_hash, settings.check_rate)
    return {task.name: route(settings, task.text_layer, verdict, in_sample) for task in tasks}


@dataclasses.dataclass(frozen=True)
class PagePlan:
    """A PDF page's tasks, split: answered by its layer, and those left for the engine (some anchored)."""

    info: ItemInfo  # the page's identity and size (as it would render), with its layer
    from_layer: tuple[str, ...]
    to_engine: tuple[str, ...]
    anchored: tuple[str, ...]


def plan_page(
    item: UnitItem, layer: PageLayer, tasks: Sequence[Task], settings: TextLayerSettings, limits: DecodeLimits
) -> PagePlan:
    routes = task_routes(settings, tasks, layer, item.content_hash)
    width, height = page_pixels(layer.signals.width_pt, layer.signals.height_pt, limits)
    info = ItemInfo(
        ref=item.ref, width=width, height=height, content_hash=item.content_hash, metadata=item.metadata,
        layer=PageText(layer.verdict.value, layer.text),
    )
    return PagePlan(
        info=info,
        from_layer=tuple(name for name, chosen in routes.items() if chosen == TEXT_LAYER),
        to_engine=tuple(name for name, chosen in routes.items() if chosen != TEXT_LAYER),
        anchored=tuple(name for name, chosen in routes.items() if chosen not in (TEXT_LAYER, MODEL)),
    )


def layer_completion(info: ItemInfo, task: str) -> TaskCompletion:
    """The answer a page's text layer gives `task`: its text, read; no request, no tokens, no latency."""
    assert info.layer is not None
    text = info.layer.text
    return TaskCompletion(
        info=info, task=task, text=text, finish_reason="text_layer", prompt_tokens=0, generated_tokens=0,
        cached_tokens=0, latency_s=0.0, attempts=0,
        task_fingerprint=layer_fingerprint(),
        parsed=ParsedAnswer(text=text), text_source=TEXT_LAYER,
    )



def anchored_request(
    item: ImageItem, task: Task, values: ItemValues, attempt: int = 0, room: Optional[int] = None
) -> EngineRequest:
    """`task`'s request for `item` (`Task.request`), its instruction anchored when the item's plan says so."""
    request = task.request(values, attempt, room)
    if task.name not in item.anchored or item.info.layer is None:
        return request
    return dataclasses.replace(request, instruction=anchored_instruction(request.instruction, item.info.layer.text))


def with_agreement(task: Task, completion: TaskCompletion) -> TaskCompletion:
    """A transcription's completion with its CER against the page's text layer, where the page has one."""
    layer = completion.info.layer
    if task.text_layer != "answer" or completion.parsed is None or layer is None or layer.verdict == Verdict.NONE.value:
        return completion
    return dataclasses.replace(completion, layer_cer=disagreement(layer.text, completion.parsed.text))
