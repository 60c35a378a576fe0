"""Readers for shard formats: WebDataset-style tars and Parquet files of image bytes.

Both read from a file object (Beam's FileSystems stream: local or gs://) and
never hold a whole shard: tars are streamed member by member (never
extracted to disk), Parquet is read one row group at a time.
"""
from __future__ import annotations

import dataclasses
import json
import posixpath
import tarfile
from typing import IO, Any, Iterator, Optional, Sequence, Union

from library.formats import UnsupportedMember
from library.metadata import encode

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif", "pdf")
TEXT_EXTENSIONS = ("txt", "cls", "caption", "label")


@dataclasses.dataclass(frozen=True)
class ShardSettings:
    """How Parquet shards are read (pipeline options fill them)."""

    parquet_id_column: str = "id"  # member key; rows without it are keyed by row number
    parquet_bytes_column: str = "image"  # binary, or a struct with a "bytes" field (Hugging Face Image)
    parquet_passthrough: tuple[str, ...] = ()  # columns copied into the rows' metadata JSON


@dataclasses.dataclass(frozen=True)
class TarSample:
    """One WebDataset sample: the members sharing a key (`dir/000123.jpg`, `dir/000123.json`)."""

    key: str
    image_name: Optional[str]  # the member holding the image, if any
    image: Optional[bytes]
    metadata: Optional[str]  # JSON of the sidecars
    member_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SpecialMember:
    """A tar member that is no file: a symbolic or hard link, a device or a FIFO. Never followed or read."""

    name: str
    kind: str  # e.g. "symbolic link to ../a.jpg"

    def refusal(self) -> UnsupportedMember:
        """Why it has no item: the error of its row (the pipeline) and of its place in the report."""
        return UnsupportedMember(
            f"tar member is a {self.kind}: links and special files in shards are not followed; "
            f"store the file itself in the shard"
        )


def _link_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"symbolic link to {info.linkname}"
    if info.islnk():
        return f"hard link to {info.linkname}"
    if info.isfifo():
        return "FIFO"
    return "device" if info.isdev() else "special member"


class TruncatedShard(ValueError):
    """The shard ended or broke before its end-of-archive marker."""


class MissingColumn(ValueError):
    """A Parquet shard without the configured image column."""


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename; the rest is the extension."""
    directory, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(directory, stem), extension.lower()


def _sidecar_value(extension: str, data: bytes) -> Any:
    text = data.decode("utf-8", errors="replace")
    if extension.endswith("json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text  # keep what is there rather than drop it
    return text


def _sample(key: str, members: list[tuple[str, bytes]]) -> TarSample:
    image_name = image = None
    sidecars: dict[str, Any] = {}
    for name, data in members:
        extension = split_key(name)[1]
        if image is None and extension.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            image_name, image = name, data
        elif extension.endswith("json") or extension in TEXT_EXTENSIONS:
            sidecars[extension] = _sidecar_value(extension, data)
    return TarSample(key, image_name, image, encode(sidecars), tuple(name for name, _ in members))


def iter_tar_samples(stream: IO[bytes], max_member_bytes: int) -> Iterator[Union[TarSample, SpecialMember]]:
    """Stream a .tar / .tar.gz, grouping consecutive members by key.

    Raises TruncatedShard (after yielding every complete sample) when the
    archive breaks off. Members over `max_member_bytes` are not read; their
    sample then has no image and is reported by the caller. Folders are
    passed over; every other member that is not a file (links, devices) is
    yielded as a SpecialMember for the caller to report: a link's target is
    never followed, inside the archive or out of it (member names never
    become paths), and silently dropping it broke "every input is accounted for".
    """
    key: Optional[str] = None
    members: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for info in archive:
                if info.isdir():
                    continue
                if not info.isfile():
                    yield SpecialMember(info.name, _link_kind(info))
                    continue
                member_key, _ = split_key(info.name)
                if member_key != key and members:
                    yield _sample(key, members)  # type: ignore[arg-type]
                    members = []
                key = member_key
                if info.size > max_member_bytes:
                    continue
                handle = archive.extractfile(info)
                members.append((info.name, handle.read() if handle else b""))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if members:
            yield _sample(key, members)  # type: ignore[arg-type]
        raise TruncatedShard(f"shard is truncated or corrupt: {exc}") from exc
    if members:
        yield _sample(key, members)  # type: ignore[arg-type]


def parquet_row_groups(handle: IO[bytes], settings: ShardSettings) -> list[int]:
    """Rows in each row group of a Parquet shard, after checking it has the image and pass-through columns."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(handle)
    names = parquet.schema_arrow.names
    # Pass-through columns are checked per shard, where the schema is known (a launch would have to open
    # every shard of a bucket): a misspelt name was silently dropped from every row's metadata.
    for wanted, option in (((settings.parquet_bytes_column,), "--parquet_bytes_column"),
                           (settings.parquet_passthrough, "--parquet_passthrough_columns")):
        missing = [column for column in wanted if column not in names]
        if missing:
            raise MissingColumn(f"Parquet shard has no column {', '.join(map(repr, missing))} ({option}); columns: {names}")
    return [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]


@dataclasses.dataclass(frozen=True)
class ParquetRow:
    member: str
    image: Optional[bytes]  # None when the cell is null
    metadata: Optional[str]


def _image_bytes(cell: Any) -> Optional[bytes]:
    if isinstance(cell, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        cell = cell.get("bytes")
    return cell


def iter_parquet_rows(handle: IO[bytes], row_group: int, settings: ShardSettings) -> Iterator[ParquetRow]:
    """The rows of one row group, keyed by the id column (or the row number in the file)."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(handle)
    names = set(parquet.schema_arrow.names)
    wanted: Sequence[str] = [
        column
        for column in dict.fromkeys([settings.parquet_id_column, settings.parquet_bytes_column, *settings.parquet_passthrough])
        if column in names
    ]
    first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(row_group))
    table = parquet.read_row_group(row_group, columns=list(wanted))
    for offset, row in enumerate(table.to_pylist()):
        identifier = row.get(settings.parquet_id_column)
        passthrough = {c: row[c] for c in settings.parquet_passthrough}  # present: parquet_row_groups checked
        yield ParquetRow(
            member=str(identifier) if identifier is not None else f"row-{first_row + offset}",
            image=_image_bytes(row.get(settings.parquet_bytes_column)),
            metadata=encode(passthrough),
        )
