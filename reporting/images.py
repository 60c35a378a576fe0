"""Sampled items' images, re-read through the pipeline's own decode functions, with their boxes drawn.

An item is decoded exactly as the pipeline decoded it (`library.formats`
with the run's limits: EXIF orientation applied, PDF pages rendered at the
run's dpi; shard members found by key with `library.shards`), so its
detection boxes, fractions of that frame, land where the model put them.
Each source is read once however many of its items are sampled. A source
that is gone or unreadable gives the reason instead of an image.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageDraw, ImageFont

from library.formats import HEAD_BYTES, DecodeError, DecodeLimits, Format, MissingImage, read_bytes, read_head, render_item, sniff
from library.shards import ShardSettings, SpecialMember, TruncatedShard, iter_parquet_rows, iter_tar_samples, parquet_row_groups
from library.units import item_hash
from reporting.text import visible
from schemas.records import ItemRef

THUMBNAIL_SIDE = 512
MIN_SIDE = 240  # smaller images are enlarged by a whole factor (nearest neighbour) so they can be seen
# Distinct on white and on photos; one colour per label, in order of first appearance.
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#0d9488", "#f032e6", "#9a6324", "#808000", "#000075")

Payload = Union[bytes, None, Exception]  # a member's bytes, None when it has no image, or why it was not read


@dataclasses.dataclass(frozen=True)
class SourceImage:
    image: Optional[Image.Image]  # the decoded item, as the pipeline saw it (before its max_side downscale)
    reason: Optional[str] = None  # why there is no image
    content_hash: Optional[str] = None  # as the pipeline computes it: differs from the row's if the source changed


def _unavailable(exc: BaseException) -> SourceImage:
    return SourceImage(None, f"{type(exc).__name__}: {exc}")


def _decode_each(refs: Sequence[ItemRef], payload: Callable[[ItemRef], bytes], limits: DecodeLimits) -> dict[str, SourceImage]:
    images = {}
    digests: dict[int, str] = {}  # one hash per payload, however many of its pages are sampled
    for ref in refs:
        try:
            data = payload(ref)
            digest = digests.setdefault(id(data), hashlib.sha256(data).hexdigest())
            image = render_item(data, sniff(data[:HEAD_BYTES]), ref.page, limits)
            images[ref.item_id] = SourceImage(image, content_hash=item_hash(digest, ref.page))
        except Exception as exc:  # noqa: BLE001 - shown on the item instead of its image
            images[ref.item_id] = _unavailable(exc)
    return images


def _tar_payloads(uri: str, members: set[str], limits: DecodeLimits) -> dict[str, Payload]:
    found: dict[str, Payload] = {}
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as stream:
        try:
            for sample in iter_tar_samples(stream, limits.max_file_bytes):
                if isinstance(sample, SpecialMember):  # a link's error row names the member itself
                    if sample.name in members:
                        found[sample.name] = sample.refusal()
                elif sample.key in members:
                    found[sample.key] = sample.image
                if len(found) == len(members):
                    break
        except TruncatedShard as exc:  # samples before the break were read, as in the pipeline
            found.update((member, exc) for member in members - set(found))
    return found


def _parquet_payloads(uri: str, members: set[str], shards: ShardSettings) -> dict[str, Payload]:
    found: dict[str, Payload] = {}
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        for group in range(len(parquet_row_groups(handle, shards))):
            found.update((row.member, row.image) for row in iter_parquet_rows(handle, group, shards) if row.member in members)
            if len(found) == len(members):
                break
    return found


def _member_payload(payloads: Mapping[str, Payload], ref: ItemRef) -> bytes:
    if ref.member is None:
        raise DecodeError("the item is the whole shard, not one image")
    payload = payloads.get(ref.member, LookupError(f"member {ref.member!r} is not in the shard"))
    if isinstance(payload, Exception):
        raise payload
    if not payload:
        raise MissingImage(f"member {ref.member!r} holds no image")
    return payload


def _source_images(uri: str, refs: Sequence[ItemRef], limits: DecodeLimits, shards: ShardSettings) -> dict[str, SourceImage]:
    members = {ref.member for ref in refs if ref.member is not None}
    if not members:
        data = read_bytes(uri, limits.max_file_bytes)
        return _decode_each(refs, lambda ref: data, limits)
    fmt = sniff(read_head(uri))
    if fmt is Format.TAR:
        payloads = _tar_payloads(uri, members, limits)
    elif fmt is Format.PARQUET:
        payloads = _parquet_payloads(uri, members, shards)
    else:
        raise DecodeError(f"the source is no longer a tar or Parquet shard (it reads as {fmt.value})")
    return _decode_each(refs, lambda ref: _member_payload(payloads, ref), limits)


def load_images(refs: Iterable[ItemRef], limits: DecodeLimits, shards: ShardSettings) -> dict[str, SourceImage]:
    """item_id -> its decoded image or the reason there is none; one read per source."""
    by_source: dict[str, list[ItemRef]] = {}
    for ref in refs:
        by_source.setdefault(ref.source_uri, []).append(ref)
    images: dict[str, SourceImage] = {}
    for uri, group in by_source.items():
        try:
            images.update(_source_images(uri, group, limits, shards))
        except Exception as exc:  # noqa: BLE001 - a missing or unreadable source: every item says why
            images.update((ref.item_id, _unavailable(exc)) for ref in group)
    return images


def thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """At most `side` pixels on the long side; tiny images enlarged to MIN_SIDE with visible pixels."""
    longest = max(image.size)
    if longest > side:
        scale, resample = side / longest, Image.Resampling.LANCZOS
    elif longest < MIN_SIDE:
        scale, resample = float(math.ceil(MIN_SIDE / longest)), Image.Resampling.NEAREST
    else:
        return image.copy()
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, resample)


def label_colours(labels: Iterable[str]) -> dict[str, str]:
    colours: dict[str, str] = {}
    for label in labels:
        colours.setdefault(label, PALETTE[len(colours) % len(PALETTE)])
    return colours


def _fractions(detection: Mapping[str, Any]) -> Optional[tuple[float, float, float, float]]:
    box = detection.get("box") or {}
    values = [box.get(key) for key in ("xmin", "ymin", "xmax", "ymax")]
    return None if any(v is None for v in values) else tuple(values)  # type: ignore[return-value]


def draw_detections(image: Image.Image, detections: Sequence[Mapping[str, Any]]) -> Image.Image:
    """`image` with each detection's box (0-1 fractions of its frame) outlined and tagged `N label`."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    colours = label_colours(d.get("label") or "" for d in detections)
    line = max(2, round(max(canvas.size) / 200))
    font = ImageFont.load_default(size=max(11, round(max(canvas.size) / 40)))
    for number, detection in enumerate(detections, 1):
        fractions = _fractions(detection)
        if fractions is None:
            continue
        left, top, right, bottom = (f * s for f, s in zip(fractions, canvas.size * 2))
        colour = colours[detection.get("label") or ""]
        draw.rectangle((left, top, right, bottom), outline=colour, width=line)
        tag = visible(f"{number} {detection.get('label') or ''}")[:40]
        x0, y0, x1, y1 = draw.textbbox((0, 0), tag, font=font)
        tag_width, tag_height = x1 - x0 + 6, y1 - y0 + 4
        tag_left = max(0.0, min(left, canvas.width - tag_width))
        tag_top = top - tag_height if top >= tag_height else top  # above the box, or inside it at the top edge
        draw.rectangle((tag_left, tag_top, tag_left + tag_width, tag_top + tag_height), fill=colour)
        draw.text((tag_left + 3 - x0, tag_top + 2 - y0), tag, fill="white", font=font)
    return canvas


def data_uri(image: Image.Image, quality: int = 85) -> str:
    """The image as an inline `data:image/jpeg;base64,...` URI (the page needs no other file)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
