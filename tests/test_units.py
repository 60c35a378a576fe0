"""The walk over a decode unit's items (`library.units`) that decoding and hashing share: no Beam, no engine."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from library import formats, storage
from library.formats import DecodeError, DecodeLimits, Format, MissingImage, NoPages
from library.shards import ShardSettings
from library.units import ItemFailure, UnitItem, item_hash, unit_items
from schemas.records import DecodeUnit, ItemRef, UnitKind
from tests.shard_data import image_bytes, parquet_bytes
from tests.test_decode import pdf_bytes

LIMITS, SHARDS = DecodeLimits(), ShardSettings(parquet_passthrough=("license",))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def nothing_is_rendered(monkeypatch):
    """The walk reads and hashes; pixels are decoding's business."""
    for function in ("decode_image_frame", "render_pdf_page"):
        monkeypatch.setattr(formats, function, lambda *args, _name=function: pytest.fail(f"{_name} called"))


def test_a_page_range_of_a_pdf_is_one_item_per_page_sharing_the_files_bytes(tmp_path):
    data = pdf_bytes(5)
    (tmp_path / "doc.pdf").write_bytes(data)
    uri = str(tmp_path / "doc.pdf")
    unit = DecodeUnit(uri=uri, kind=UnitKind.PDF, first_page=2, end_page=4, page_count=5, metadata='{"k": 1}')
    assert list(unit_items(unit, LIMITS, SHARDS)) == [
        UnitItem(ItemRef.make(uri, page=page), data, Format.PDF, item_hash(sha256(data), page), '{"k": 1}') for page in (2, 3)
    ]


def test_a_single_image_file_is_one_item_without_a_page_hashed_as_the_file(tmp_path):
    data = image_bytes((1, 2, 3))
    (tmp_path / "a.png").write_bytes(data)
    unit = DecodeUnit(uri=str(tmp_path / "a.png"), kind=UnitKind.IMAGE, first_page=0, end_page=1, page_count=1)
    [item] = unit_items(unit, LIMITS, SHARDS)
    assert item.ref == ItemRef.make(str(tmp_path / "a.png")) and item.content_hash == sha256(data) and item.fmt is Format.IMAGE


def test_a_file_that_cannot_be_read_fails_each_of_the_units_items(tmp_path):
    uri = str(tmp_path / "gone.pdf")
    unit = DecodeUnit(uri=uri, kind=UnitKind.PDF, first_page=0, end_page=2, page_count=2, metadata='{"k": 1}')
    entries = list(unit_items(unit, LIMITS, SHARDS))
    assert [(e.ref, e.content_hash, e.metadata) for e in entries] == [
        (ItemRef.make(uri, page=page), None, '{"k": 1}') for page in (0, 1)
    ]
    assert all(isinstance(e, ItemFailure) for e in entries)


def test_a_tar_members_document_is_paged_and_an_unreadable_one_fails_with_its_hash():
    document = pdf_bytes(3)
    member = DecodeUnit(uri="/s.tar", kind=UnitKind.MEMBER, first_page=0, end_page=1, page_count=1, member="d/1", payload=document)
    assert [(e.ref.page, e.ref.member, e.content_hash) for e in unit_items(member, LIMITS, SHARDS)] == [
        (page, "d/1", item_hash(sha256(document), page)) for page in range(3)
    ]
    broken = b"%PDF-1.4 no page tree"
    [failed] = unit_items(dataclasses.replace(member, payload=broken), LIMITS, SHARDS)
    assert isinstance(failed, ItemFailure) and failed.ref == ItemRef.make("/s.tar", member="d/1")
    assert failed.content_hash == sha256(broken) and isinstance(failed.error, DecodeError)


def test_a_parquet_row_group_yields_its_rows_with_their_columns_and_a_null_cell_as_a_failure(tmp_path):
    picture = image_bytes((9, 9, 9))
    path = tmp_path / "shard.parquet"
    path.write_bytes(parquet_bytes({"id": ["a", "b", "c"], "image": [image_bytes((0, 0, 0)), picture, None], "license": ["l1", "l2", "l3"]},
                                   row_group_size=1))
    unit = DecodeUnit(uri=str(path), kind=UnitKind.PARQUET, first_page=1, end_page=2, page_count=3, rows=1, metadata='{"m": 0}')
    [item] = unit_items(unit, LIMITS, SHARDS)
    assert item.ref == ItemRef.make(str(path), member="b") and item.content_hash == sha256(picture)
    assert json.loads(item.metadata) == {"m": 0, "license": "l2"}
    [null] = unit_items(dataclasses.replace(unit, first_page=2, end_page=3), LIMITS, SHARDS)
    assert isinstance(null, ItemFailure) and isinstance(null.error, MissingImage)
    assert null.ref == ItemRef.make(str(path), member="c") and json.loads(null.metadata) == {"m": 0, "license": "l3"}


def test_an_unreadable_row_group_is_one_failure_naming_it(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    unit = DecodeUnit(uri=str(tmp_path / "bad.parquet"), kind=UnitKind.PARQUET, first_page=4, end_page=5, page_count=9, rows=3)
    [failed] = unit_items(unit, LIMITS, SHARDS)
    assert failed.ref == ItemRef.make(str(tmp_path / "bad.parquet")) and str(failed.error).startswith("row group 4: ")


def test_a_storage_outage_is_raised_not_yielded(tmp_path, monkeypatch):
    outage = storage.StorageFailure("read", ["gs://b/s.parquet"], 2.0, 3, "ServiceUnavailable: 503")

    def down(*args, **kwargs):
        raise OSError("read failed") from outage

    monkeypatch.setattr("library.units.FileSystems.open", down)
    unit = DecodeUnit(uri="gs://b/s.parquet", kind=UnitKind.PARQUET, first_page=0, end_page=1, page_count=1, rows=2)
    with pytest.raises(storage.StorageFailure):
        list(unit_items(unit, LIMITS, SHARDS))


def test_the_limit_counts_failures_as_items(tmp_path):
    uri = str(tmp_path / "gone.pdf")
    unit = DecodeUnit(uri=uri, kind=UnitKind.PDF, first_page=0, end_page=8, page_count=8, max_items=3)
    assert [e.ref.page for e in unit_items(unit, LIMITS, SHARDS)] == [0, 1, 2]


def test_an_item_that_fails_later_keeps_its_identity():
    item = UnitItem(ItemRef.make("/a.png"), b"data", Format.IMAGE, "h", '{"k": 1}')
    error = NoPages("x")
    assert item.failed(error) == ItemFailure(item.ref, error, "h", '{"k": 1}')
