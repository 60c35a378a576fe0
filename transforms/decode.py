"""Decode stage: source files -> page ranges -> RGB images with known identity and size.

Two steps with a reshuffle between them (wired in `pipelines.vision_batch`):
`PlanUnits` sniffs each file and cuts paged sources into page ranges;
`DecodeUnits` renders/decodes one range. A long PDF therefore spreads over
many workers instead of one worker rendering 2,000 pages while others idle.

Every failure becomes an ErrorRecord for the file or page it concerns; no
exception escapes to fail the bundle for the other items.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import re
import threading
import zlib
from typing import Callable, Iterable, Iterator, Optional

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas.records import DecodeUnit, ErrorRecord, ImageItem, ItemInfo, ItemRef, SourceFile
from transforms import metrics
from transforms.shards import ShardSettings, TruncatedShard, iter_parquet_rows, iter_tar_samples, parquet_row_groups

ERRORS_TAG = "errors"

_PDF_MAGIC = b"%PDF-"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PARQUET_MAGIC = b"PAR1"
_GZIP_MAGIC = b"\x1f\x8b"
HEAD_BYTES = 4096  # enough to sniff every format, including a gzip-compressed tar header
# PDFium is not thread-safe: concurrent renders in one process corrupt memory.
_PDFIUM_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """Safety limits and rendering settings (pipeline options fill them)."""

    pdf_dpi: float = 150.0  # enough for OCR of 9 pt text; 300 dpi quadruples pixels for little gain
    pages_per_unit: int = 8  # pages decoded together: fewer whole-file reads vs. finer fan-out
    max_pages: int = 5000  # a "PDF" with more pages is almost always a generated/broken file
    max_file_bytes: int = 256 * 2**20  # whole file is held in memory while decoding
    max_image_pixels: int = 64_000_000  # decompression-bomb guard, checked before pixels are loaded
    max_side: int = 3072  # images are downscaled to this before the engine; the processor resizes anyway


class DecodeError(ValueError):
    """Input that is readable but not acceptable; the subclass name is the row's error_type."""


class EmptyFile(DecodeError):
    pass


class FileTooLarge(DecodeError):
    pass


class ImageTooLarge(DecodeError):
    """Over max_image_pixels: the decompression-bomb guard."""


class TooManyPages(DecodeError):
    pass


class NoPages(DecodeError):
    pass


class MissingImage(DecodeError):
    """A shard member or row that holds no image."""


class EmptyShard(DecodeError):
    pass


class EncryptedPdf(DecodeError):
    pass


class UnsupportedFormat(DecodeError):
    pass


class TruncatedImage(DecodeError):
    pass


class UnreadablePdf(DecodeError):
    pass


_ZERO_PAGE_TREE = re.compile(rb"/Type\s*/Pages\b[^>]*?/Count\s+0\b|/Count\s+0\b[^>]*?/Type\s*/Pages\b")


def open_pdf(data: bytes):  # -> pypdfium2.PdfDocument
    """Open a PDF, turning PDFium's error codes into a reason a person can act on.

    PDFium refuses documents whose page tree is empty with the same codes as
    damaged ones (even "incorrect password"), so those cases are told apart here.
    """
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if b"/Encrypt" in data:
            raise EncryptedPdf(f"PDF is password-protected ({exc})") from exc
        if _ZERO_PAGE_TREE.search(data):
            raise NoPages(f"PDF has an empty page tree ({exc})") from exc
        raise UnreadablePdf(f"PDF is damaged or not a PDF ({exc})") from exc


def read_bytes(uri: str, limit: int) -> bytes:
    """Whole object as bytes, refusing objects over `limit` (no transparent gunzip)."""
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"file is larger than the {limit}-byte limit (max_file_bytes)")
    if not data:
        raise EmptyFile("file is empty")
    return data


def _is_tar(head: bytes) -> bool:
    if len(head) >= 1024 and not head[:1024].strip(b"\0"):
        return True  # an empty archive: only the two zero end-of-archive blocks
    if head[:2] == _GZIP_MAGIC:
        try:
            head = zlib.decompressobj(wbits=31).decompress(head, 1024)
        except zlib.error:
            return False
    return head[257:262] == b"ustar"


def sniff_kind(head: bytes) -> str:
    """"pdf", "tiff", "tar", "parquet" or "image" from the leading bytes; extensions lie."""
    if _PDF_MAGIC in head[:1024]:
        return "pdf"
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    if head[:4] == _PARQUET_MAGIC:
        return "parquet"
    if _is_tar(head):
        return "tar"
    return "image"


def page_count(data: bytes, kind: str, limits: DecodeLimits) -> int:
    """Pages of a PDF or frames of a TIFF, refusing empty and over-long documents."""
    pages = pdf_page_count(data) if kind == "pdf" else image_frame_count(data)
    if pages < 1:
        raise NoPages("document has no pages")
    if pages > limits.max_pages:
        raise TooManyPages(f"document has {pages} pages, over the max_pages limit of {limits.max_pages}")
    return pages


def pdf_page_count(data: bytes) -> int:
    with _PDFIUM_LOCK:
        document = open_pdf(data)
        try:
            return len(document)
        finally:
            document.close()


def image_frame_count(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        return getattr(image, "n_frames", 1)


def read_head(uri: str, size: int = HEAD_BYTES) -> bytes:
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read(size)


def plan_file_units(source: SourceFile, kind: str, load: Callable[[], bytes], limits: DecodeLimits) -> list[DecodeUnit]:
    """Cut an image or document file into DecodeUnits of at most `pages_per_unit` pages.

    Only paged formats are read whole here (to count pages); a plain image
    costs no read beyond the sniffed head.
    """
    if kind not in ("pdf", "tiff"):
        return [DecodeUnit(uri=source.uri, kind="image", first_page=0, end_page=1, page_count=1)]
    pages = page_count(load(), kind, limits)
    unit_kind = "pdf" if kind == "pdf" else "image"
    step = max(1, limits.pages_per_unit)
    return [
        DecodeUnit(uri=source.uri, kind=unit_kind, first_page=start, end_page=min(pages, start + step), page_count=pages)
        for start in range(0, pages, step)
    ]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, transparent areas on white.

    16-bit and float greyscale are rescaled by their range: a plain convert()
    clips them to white. Alpha is composited on white: dropping it turns
    transparent-background text black on black.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if high <= low else (array - low) * (255.0 / (high - low))
        image = Image.fromarray(scaled.astype(np.uint8))
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    image = image.copy()
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def decode_image_frame(data: bytes, frame: int, limits: DecodeLimits) -> Image.Image:
    """One frame of an image file, EXIF-oriented, RGB, size-checked before pixels are loaded."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own guard, above ours
        raise ImageTooLarge(f"{exc} (max_image_pixels is {limits.max_image_pixels})") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedFormat(
            f"not an image, PDF, tar or Parquet shard this pipeline reads; first bytes: {data[:16]!r}"
        ) from exc
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the max_image_pixels limit "
            f"of {limits.max_image_pixels} (decompression-bomb guard)"
        )
    if frame:
        image.seek(frame)
    try:
        image.load()
    except OSError as exc:
        if "truncated" in str(exc):
            raise TruncatedImage(str(exc)) from exc
        raise
    return to_rgb(ImageOps.exif_transpose(image))


def render_pdf_page(data: bytes, page_index: int, limits: DecodeLimits) -> Image.Image:
    """One PDF page rendered at `pdf_dpi`, lowered if the page would exceed `max_image_pixels`."""
    with _PDFIUM_LOCK:
        document = open_pdf(data)
        try:
            page = document[page_index]
            try:
                width_pt, height_pt = page.get_size()
                scale = limits.pdf_dpi / 72.0
                pixels = width_pt * height_pt * scale * scale
                if pixels > limits.max_image_pixels:
                    scale *= (limits.max_image_pixels / pixels) ** 0.5
                if width_pt * scale < 1 or height_pt * scale < 1:
                    raise DecodeError(f"page is {width_pt}x{height_pt} pt: too small to render")
                rendered = page.render(scale=scale).to_pil()
            finally:
                page.close()
        finally:
            document.close()
    return to_rgb(rendered)


def item_hash(source_sha256: str, page: Optional[int]) -> str:
    """Content hash of one item: its source's own hash, or source hash + page for pages."""
    if page is None:
        return source_sha256
    return hashlib.sha256(f"{source_sha256}#page={page}".encode()).hexdigest()


def _error(ref: ItemRef, stage: str, exc: BaseException, **kwargs: object) -> pvalue.TaggedOutput:
    metrics.count(f"errors_{stage}")
    return pvalue.TaggedOutput(ERRORS_TAG, ErrorRecord.from_exception(ref, stage, exc, **kwargs))  # type: ignore[arg-type]


class PlanUnits(beam.DoFn):
    """SourceFile -> DecodeUnits (page ranges, row groups, tar members); refused files -> ErrorRecord."""

    def __init__(self, limits: DecodeLimits, shards: ShardSettings, max_items: Optional[int] = None):
        self._limits = limits
        self._shards = shards
        self._max_items = max_items  # --limit: a tar shard is streamed no further than this

    def process(self, source: SourceFile) -> Iterator[object]:
        ref = ItemRef.make(source.uri)
        try:
            head = read_head(source.uri)
            if not head:
                raise EmptyFile("file is empty")
            kind = sniff_kind(head)
            # Shards are streamed or read by row group, so the whole-file size limit applies to other files only.
            if kind == "tar":
                yield from self._tar_members(source)
                return
            if kind == "parquet":
                units = self._parquet_units(source)
            elif source.size_bytes > self._limits.max_file_bytes:
                raise FileTooLarge(
                    f"file is {source.size_bytes} bytes, over the max_file_bytes limit of {self._limits.max_file_bytes}"
                )
            else:
                units = plan_file_units(source, kind, lambda: read_bytes(source.uri, self._limits.max_file_bytes), self._limits)
        except Exception as exc:  # noqa: BLE001 - any failure of one file becomes its error row
            yield _error(ref, "plan", exc)
            return
        metrics.count("decode_units", len(units))
        metrics.count("items_planned", sum(unit.end_page - unit.first_page for unit in units if unit.kind != "parquet"))
        yield from units

    def _parquet_units(self, source: SourceFile) -> list[DecodeUnit]:
        with FileSystems.open(source.uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            rows = parquet_row_groups(handle, self._shards)
        metrics.count("shards")
        metrics.count("items_planned", sum(rows))
        return [
            DecodeUnit(uri=source.uri, kind="parquet", first_page=g, end_page=g + 1, page_count=len(rows), rows=count)
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
                    samples += 1
                    ref = ItemRef.make(source.uri, member=sample.key)
                    if sample.image is None:
                        yield _error(
                            ref,
                            "plan",
                            MissingImage(
                                f"sample has no image member (members: {', '.join(sample.member_names)}; "
                                f"images over max_file_bytes are not read)"
                            ),
                            metadata=sample.metadata,
                        )
                        continue
                    metrics.count("decode_units")
                    metrics.count("items_planned")
                    yield DecodeUnit(
                        uri=source.uri, kind="member", first_page=0, end_page=1, page_count=1,
                        member=sample.key, payload=sample.image, metadata=sample.metadata,
                    )
            except TruncatedShard as exc:
                yield _error(ItemRef.make(source.uri), "plan", exc)
                return
        if not samples:
            yield _error(ItemRef.make(source.uri), "plan", EmptyShard("tar shard holds no files"))


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
    """DecodeUnit -> ImageItem per page; a page, member or row that fails -> ErrorRecord for it only."""

    def __init__(self, limits: DecodeLimits, shards: ShardSettings):
        self._limits = limits
        self._shards = shards

    def process(self, unit: DecodeUnit) -> Iterator[object]:
        if unit.kind == "member":
            outputs = self._payload_items(unit.payload or b"", unit.uri, unit.member, unit.metadata)
        elif unit.kind == "parquet":
            outputs = self._parquet_items(unit)
        else:
            outputs = self._file_items(unit)
        # Each output is one item or one item's error row; --limit stops the unit after its share.
        yield from itertools.islice(outputs, unit.max_items)

    def _file_items(self, unit: DecodeUnit) -> Iterator[object]:
        pages = range(unit.first_page, unit.end_page)
        try:
            data = read_bytes(unit.uri, self._limits.max_file_bytes)
        except Exception as exc:  # noqa: BLE001
            for page in pages:
                yield _error(ItemRef.make(unit.uri, page=page if unit.is_paged else None), "decode", exc)
            return
        yield from self._items(data, unit.kind, unit.uri, None, None, pages if unit.is_paged else None)

    def _payload_items(self, data: bytes, uri: str, member: Optional[str], metadata: Optional[str]) -> Iterator[object]:
        """All pages of an in-memory payload (tar member or Parquet cell)."""
        kind = sniff_kind(data[:HEAD_BYTES])
        pages = None
        if kind in ("pdf", "tiff"):
            try:
                count = page_count(data, kind, self._limits)
            except Exception as exc:  # noqa: BLE001
                yield _error(ItemRef.make(uri, member=member), "decode", exc, metadata=metadata,
                             content_hash=hashlib.sha256(data).hexdigest())
                return
            pages = range(count) if count > 1 or kind == "pdf" else None
        yield from self._items(data, "pdf" if kind == "pdf" else "image", uri, member, metadata, pages)

    def _parquet_items(self, unit: DecodeUnit) -> Iterator[object]:
        try:
            with FileSystems.open(unit.uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                rows = list(iter_parquet_rows(handle, unit.first_page, self._shards))
        except Exception as exc:  # noqa: BLE001
            yield _error(ItemRef.make(unit.uri), "decode", DecodeError(f"row group {unit.first_page}: {exc}"))
            return
        for row in rows:
            if not row.image:
                yield _error(ItemRef.make(unit.uri, member=row.member), "decode",
                             MissingImage(f"column {self._shards.parquet_bytes_column!r} is null or empty"),
                             metadata=row.metadata)
                continue
            yield from self._payload_items(row.image, unit.uri, row.member, row.metadata)

    def _items(
        self, data: bytes, kind: str, uri: str, member: Optional[str], metadata: Optional[str], pages: Optional[range]
    ) -> Iterator[object]:
        source_sha256 = hashlib.sha256(data).hexdigest()
        for page in pages if pages is not None else [None]:
            ref = ItemRef.make(uri, page=page, member=member)
            content_hash = item_hash(source_sha256, page)
            try:
                if kind == "pdf":
                    image = render_pdf_page(data, page or 0, self._limits)
                else:
                    image = decode_image_frame(data, page or 0, self._limits)
            except Exception as exc:  # noqa: BLE001
                yield _error(ref, "decode", exc, content_hash=content_hash, metadata=metadata)
                continue
            metrics.count("items")
            if page is not None:
                metrics.count("pages")
            info = ItemInfo(ref=ref, width=image.width, height=image.height, content_hash=content_hash, metadata=metadata)
            yield ImageItem(info=info, image=_fit(image, self._limits.max_side))
