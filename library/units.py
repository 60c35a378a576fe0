"""The items of a decode unit, read but not decoded: the one walk that decoding and hashing share.

A `DecodeUnit` (`schemas.records`) is a page range of a file, one tar
member's bytes or one Parquet row group. `unit_items` walks it item by item
(an image file, a page or frame, a member, a row, a page of a document
held in a member or row) and yields, per item, either its bytes with what
identifies it (`UnitItem`: ref, format, content hash, metadata) or why it
could not be read (`ItemFailure`). Nothing is decoded or rendered here.

`transforms.decode.DecodeUnits` renders each `UnitItem` into an ImageItem
(or skips it, in incremental runs); `transforms.incremental.HashUnits` keys
each by its content hash without decoding a pixel. Both compose this walk,
so they see the same items with the same ids, hashes and metadata by
construction. No Beam here beyond its FileSystems for reading.

A storage outage is raised, never yielded: an object that cannot be read
because storage is down is not a bad input (`library.storage.raise_if_outage`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Iterator, Optional, Sequence, Union

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from library import storage
from library.formats import HEAD_BYTES, DecodeError, DecodeLimits, Format, MissingImage, is_paged, page_count, read_bytes, sniff
from library.metadata import merge
from library.shards import ShardSettings, iter_parquet_rows
from schemas.records import DecodeUnit, ItemRef, UnitKind

_WHOLE = (None,)  # the pages of a source that is one item: no page number


@dataclasses.dataclass(frozen=True)
class ItemFailure:
    """An item that could not be read, or a whole unit none of which could (a Parquet row group): its error row."""

    ref: ItemRef
    error: Exception
    content_hash: Optional[str] = None  # when its bytes were read (a document whose pages cannot be counted)
    metadata: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class UnitItem:
    """One item of a unit, read: what decoding renders and hashing keys."""

    ref: ItemRef
    data: bytes  # the bytes holding the item: its file, tar member or Parquet cell (a document's pages share them)
    fmt: Format
    content_hash: str  # `item_hash` of `data` and the page
    metadata: Optional[str]  # JSON: the unit's, with a Parquet row's pass-through columns merged in

    def failed(self, error: Exception) -> ItemFailure:
        """The item's failure after it was read (its pixels do not decode): the same ref, hash and metadata."""
        return ItemFailure(self.ref, error, self.content_hash, self.metadata)


UnitEntry = Union[UnitItem, ItemFailure]


def item_hash(source_sha256: str, page: Optional[int]) -> str:
    """Content hash of one item: its source's own hash, or source hash + page for pages."""
    if page is None:
        return source_sha256
    return hashlib.sha256(f"{source_sha256}#page={page}".encode()).hexdigest()


def unit_items(unit: DecodeUnit, limits: DecodeLimits, shards: ShardSettings) -> Iterator[UnitEntry]:
    """Each item of `unit` in order, read or failed: one entry per item, at most `unit.max_items` (--limit)."""
    if unit.kind is UnitKind.MEMBER:
        entries = _payload_items(unit.payload or b"", unit.uri, unit.member, unit.metadata, limits)
    elif unit.kind is UnitKind.PARQUET:
        entries = _parquet_items(unit, limits, shards)
    else:
        entries = _file_items(unit, limits)
    return itertools.islice(entries, unit.max_items)


def _file_items(unit: DecodeUnit, limits: DecodeLimits) -> Iterator[UnitEntry]:
    pages = range(unit.first_page, unit.end_page) if unit.is_paged else _WHOLE
    try:
        data = read_bytes(unit.uri, limits.max_file_bytes)
    except Exception as exc:  # noqa: BLE001 - a file that cannot be read fails each of the unit's items
        storage.raise_if_outage(exc)
        for page in pages:
            yield ItemFailure(ItemRef.make(unit.uri, page=page), exc, metadata=unit.metadata)
        return
    fmt = Format.PDF if unit.kind is UnitKind.PDF else Format.IMAGE
    yield from _items(data, fmt, unit.uri, None, unit.metadata, pages)


def _payload_items(
    data: bytes, uri: str, member: Optional[str], metadata: Optional[str], limits: DecodeLimits
) -> Iterator[UnitEntry]:
    """All pages of an in-memory payload (tar member or Parquet cell): counted here, as planning never saw them."""
    fmt = sniff(data[:HEAD_BYTES])
    pages: Sequence[Optional[int]] = _WHOLE
    if fmt.has_pages:
        try:
            count = page_count(data, fmt, limits)
        except Exception as exc:  # noqa: BLE001 - the document is one failed item
            storage.raise_if_outage(exc)
            yield ItemFailure(ItemRef.make(uri, member=member), exc, hashlib.sha256(data).hexdigest(), metadata)
            return
        if is_paged(fmt, count):
            pages = range(count)
    yield from _items(data, fmt, uri, member, metadata, pages)


def _parquet_items(unit: DecodeUnit, limits: DecodeLimits, shards: ShardSettings) -> Iterator[UnitEntry]:
    try:
        with FileSystems.open(unit.uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            rows = list(iter_parquet_rows(handle, unit.first_page, shards))
    except Exception as exc:  # noqa: BLE001 - an unreadable row group is one failure for the whole unit
        storage.raise_if_outage(exc)  # before wrapping: the DecodeError below does not chain `exc`
        yield ItemFailure(ItemRef.make(unit.uri), DecodeError(f"row group {unit.first_page}: {exc}"))
        return
    for row in rows:
        row_metadata = merge(unit.metadata, row.metadata)
        if not row.image:
            error = MissingImage(f"column {shards.parquet_bytes_column!r} is null or empty")
            yield ItemFailure(ItemRef.make(unit.uri, member=row.member), error, metadata=row_metadata)
            continue
        yield from _payload_items(row.image, unit.uri, row.member, row_metadata, limits)


def _items(
    data: bytes, fmt: Format, uri: str, member: Optional[str], metadata: Optional[str], pages: Sequence[Optional[int]]
) -> Iterator[UnitItem]:
    source_sha256 = hashlib.sha256(data).hexdigest()
    for page in pages:
        yield UnitItem(ItemRef.make(uri, page=page, member=member), data, fmt, item_hash(source_sha256, page), metadata)
