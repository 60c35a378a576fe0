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
import threading
from typing import Callable, Iterator, Optional

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageOps

from schemas.records import DecodeUnit, ErrorRecord, ImageItem, ItemInfo, ItemRef, SourceFile
from transforms import metrics

ERRORS_TAG = "errors"

_PDF_MAGIC = b"%PDF-"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
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
    """Input that is readable but not acceptable (empty, too big, unsupported)."""


def read_bytes(uri: str, limit: int) -> bytes:
    """Whole object as bytes, refusing objects over `limit` (no transparent gunzip)."""
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise DecodeError(f"file is larger than the {limit}-byte limit (max_file_bytes)")
    if not data:
        raise DecodeError("file is empty")
    return data


def sniff_kind(head: bytes) -> str:
    """"pdf", "tiff" or "image" from the leading bytes; extensions lie."""
    if _PDF_MAGIC in head[:1024]:
        return "pdf"
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    return "image"


def pdf_page_count(data: bytes) -> int:
    import pypdfium2 as pdfium

    with _PDFIUM_LOCK:
        document = pdfium.PdfDocument(data)
        try:
            return len(document)
        finally:
            document.close()


def image_frame_count(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        return getattr(image, "n_frames", 1)


def read_head(uri: str, size: int = 1024) -> bytes:
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read(size)


def plan_units(source: SourceFile, head: bytes, load: Callable[[], bytes], limits: DecodeLimits) -> list[DecodeUnit]:
    """Cut one source file into DecodeUnits of at most `pages_per_unit` pages.

    Only paged formats are read whole here (to count pages); a plain image
    costs one 1 KiB read.
    """
    if source.size_bytes > limits.max_file_bytes:
        raise DecodeError(f"file is {source.size_bytes} bytes, over the max_file_bytes limit of {limits.max_file_bytes}")
    if not head:
        raise DecodeError("file is empty")
    kind = sniff_kind(head)
    if kind == "pdf":
        pages = pdf_page_count(load())
    elif kind == "tiff":
        pages = image_frame_count(load())
    else:
        return [DecodeUnit(uri=source.uri, kind="image", first_page=0, end_page=1, page_count=1)]
    if pages < 1:
        raise DecodeError("document has no pages")
    if pages > limits.max_pages:
        raise DecodeError(f"document has {pages} pages, over the max_pages limit of {limits.max_pages}")
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
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise DecodeError(
            f"image is {width}x{height} = {width * height} pixels, over the max_image_pixels limit "
            f"of {limits.max_image_pixels} (decompression-bomb guard)"
        )
    if frame:
        image.seek(frame)
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def render_pdf_page(data: bytes, page_index: int, limits: DecodeLimits) -> Image.Image:
    """One PDF page rendered at `pdf_dpi`, lowered if the page would exceed `max_image_pixels`."""
    import pypdfium2 as pdfium

    with _PDFIUM_LOCK:
        document = pdfium.PdfDocument(data)
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


def item_hash(file_sha256: str, unit: DecodeUnit, page: int) -> str:
    """Content hash of one item: the file's own hash, or file hash + page for paged sources."""
    if not unit.is_paged:
        return file_sha256
    return hashlib.sha256(f"{file_sha256}#page={page}".encode()).hexdigest()


class PlanUnits(beam.DoFn):
    """SourceFile -> DecodeUnit per page range; unreadable or refused files -> ErrorRecord."""

    def __init__(self, limits: DecodeLimits):
        self._limits = limits

    def process(self, source: SourceFile) -> Iterator[object]:
        try:
            units = plan_units(
                source,
                read_head(source.uri),
                lambda: read_bytes(source.uri, self._limits.max_file_bytes),
                self._limits,
            )
        except Exception as exc:  # noqa: BLE001 - any failure of one file becomes its error row
            metrics.count("errors_plan")
            yield pvalue.TaggedOutput(ERRORS_TAG, ErrorRecord.from_exception(ItemRef.make(source.uri), "plan", exc))
            return
        metrics.count("decode_units", len(units))
        yield from units


class DecodeUnits(beam.DoFn):
    """DecodeUnit -> ImageItem per page; a page that fails -> ErrorRecord for that page only."""

    def __init__(self, limits: DecodeLimits):
        self._limits = limits

    def process(self, unit: DecodeUnit) -> Iterator[object]:
        try:
            data = read_bytes(unit.uri, self._limits.max_file_bytes)
        except Exception as exc:  # noqa: BLE001
            for page in range(unit.first_page, unit.end_page):
                yield self._error(unit, page, exc)
            return
        file_sha256 = hashlib.sha256(data).hexdigest()
        for page in range(unit.first_page, unit.end_page):
            try:
                image = self._decode_page(data, unit, page)
            except Exception as exc:  # noqa: BLE001
                yield self._error(unit, page, exc, item_hash(file_sha256, unit, page))
                continue
            ref = ItemRef.make(unit.uri, page=page if unit.is_paged else None)
            info = ItemInfo(ref=ref, width=image.width, height=image.height, content_hash=item_hash(file_sha256, unit, page))
            metrics.count("items")
            if unit.is_paged:
                metrics.count("pages")
            yield ImageItem(info=info, image=_fit(image, self._limits.max_side))

    def _decode_page(self, data: bytes, unit: DecodeUnit, page: int) -> Image.Image:
        if unit.kind == "pdf":
            return render_pdf_page(data, page, self._limits)
        return decode_image_frame(data, page, self._limits)

    @staticmethod
    def _error(unit: DecodeUnit, page: int, exc: BaseException, content_hash: Optional[str] = None) -> pvalue.TaggedOutput:
        metrics.count("errors_decode")
        ref = ItemRef.make(unit.uri, page=page if unit.is_paged else None)
        return pvalue.TaggedOutput(ERRORS_TAG, ErrorRecord.from_exception(ref, "decode", exc, content_hash=content_hash))
