"""Builders for test inputs in shard formats (tar, Parquet) and encoded images."""
from __future__ import annotations

import io
import json
import pathlib
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def image_bytes(color: tuple[int, int, int], size=(96, 64), fmt="PNG") -> bytes:
    return encode(Image.new("RGB", size, color), fmt)


def tar_bytes(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def parquet_bytes(columns: dict, row_group_size: int | None = None) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, row_group_size=row_group_size)
    return buffer.getvalue()


def write_tar(path: pathlib.Path, mode: str = "w") -> None:
    """3 samples with an image each (json / txt sidecars) and a 4th with no image."""
    path.write_bytes(tar_bytes([
        ("shard/000001.jpg", image_bytes((200, 10, 10), fmt="JPEG")),
        ("shard/000001.json", json.dumps({"source": "camera-1", "tags": ["a"]}).encode()),
        ("shard/000002.png", image_bytes((10, 200, 10))),
        ("shard/000002.txt", b"a green square"),
        ("shard/000003.webp", image_bytes((10, 10, 200), fmt="WEBP")),
        ("shard/000004.json", b'{"orphan": true}'),
    ], mode))


def write_parquet_shard(path: pathlib.Path) -> None:
    """3 rows of two row groups: two images and a null cell, with a pass-through column."""
    path.write_bytes(parquet_bytes({
        "id": ["p-1", "p-2", "p-3"],
        "image": [image_bytes((250, 250, 0)), image_bytes((0, 250, 250)), None],
        "license": ["cc-by", "cc0", "cc0"],
    }, row_group_size=2))
