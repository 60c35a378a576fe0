"""Input formats: how every kind of input is recognised, opened and rendered to an RGB image.

The one place that knows file formats. Decoding (`transforms.decode`), the
report (`reporting.images`) and the reference builders (`evaluation`) all
sniff and render through here, so an item looks the same to the model, in
the report and to the evaluator. Formats are recognised by content, never by
extension (extensions lie). Shards (tar, Parquet) are containers of items:
their readers are in `library.shards`.

Each refusal is a `DecodeError` subclass whose name becomes the error row's
`error_type`.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import math
import re
import threading
import zlib
from typing import Optional

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageOps, UnidentifiedImageError

_PDF_MAGIC = b"%PDF-"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PARQUET_MAGIC = b"PAR1"
_GZIP_MAGIC = b"\x1f\x8b"
HEAD_BYTES = 4096  # enough to sniff every format, including a gzip-compressed tar header
# PDFium is not thread-safe: concurrent renders in one process corrupt memory.
_PDFIUM_LOCK = threading.Lock()
PDFIUM_LOCK = _PDFIUM_LOCK  # the same lock, for the other readers of PDFium (library.text_layer)


class Format(enum.Enum):
    """What a file (or a shard member's bytes) holds, from its leading bytes."""

    PDF = "pdf"
    TIFF = "tiff"  # possibly several frames
    TAR = "tar"  # WebDataset-style shard (plain or gzip)
    PARQUET = "parquet"  # shard of image bytes
    IMAGE = "image"  # anything else Pillow may open (PNG, JPEG, WebP, BMP, GIF, ...)

    @property
    def is_shard(self) -> bool:
        """A container of items rather than one image or document."""
        return self in (Format.TAR, Format.PARQUET)

    @property
    def has_pages(self) -> bool:
        """Pages (PDF) or frames (TIFF) are counted at planning and may be spread over units."""
        return self in (Format.PDF, Format.TIFF)


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """Safety limits and rendering settings (pipeline options fill them)."""

    pdf_dpi: float = 150.0  # enough for OCR of 9 pt text; 300 dpi quadruples pixels for little gain
    pages_per_unit: int = 8  # pages decoded together: fewer whole-file reads vs. finer fan-out
    max_pages: int = 5000  # a "PDF" with more pages is almost always a generated/broken file
    max_file_bytes: int = 256 * 2**20  # whole file is held in memory while decoding
    max_image_pixels: int = 64_000_000  # decompression-bomb guard, checked before pixels are loaded
    max_side: int = 3072  # images are downscaled to this before the engine; the processor resizes anyway
    # Page checks of document pages and scans (library.page_checks), each with its option:
    skip_blank_pages: bool = True  # a blank page is answered empty without the engine (--skip_blank_pages)
    upright_pages: bool = True  # pages are turned upright by Tesseract's OSD before the model sees them (--upright_pages)


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


class UnsupportedMember(DecodeError):
    """A tar member that is a link (symbolic or hard), a device or a FIFO: not followed, not read."""


class EncryptedPdf(DecodeError):
    pass


class UnsupportedFormat(DecodeError):
    pass


class TruncatedImage(DecodeError):
    pass


class UnreadablePdf(DecodeError):
    pass


def _is_tar(head: bytes) -> bool:
    if len(head) >= 1024 and not head[:1024].strip(b"\0"):
        return True  # an empty archive: only the two zero end-of-archive blocks
    if head[:2] == _GZIP_MAGIC:
        try:
            head = zlib.decompressobj(wbits=31).decompress(head, 1024)
        except zlib.error:
            return False
    return head[257:262] == b"ustar"


def sniff(head: bytes) -> Format:
    """The format of a file from its first `HEAD_BYTES`; unknown content is left to Pillow (IMAGE)."""
    if head[:4] in _TIFF_MAGICS:
        return Format.TIFF
    if head[:4] == _PARQUET_MAGIC:
        return Format.PARQUET
    # Before the PDF check: a tar's first member starts at byte 512, so a shard whose first
    # member is a PDF has "%PDF" in its first 1,024 bytes; sniffed as a PDF, its other members were lost.
    if _is_tar(head):
        return Format.TAR
    if _PDF_MAGIC in head[:1024]:
        return Format.PDF
    return Format.IMAGE


def read_head(uri: str, size: int = HEAD_BYTES) -> bytes:
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read(size)


def read_bytes(uri: str, limit: int) -> bytes:
    """Whole object as bytes, refusing objects over `limit` (no transparent gunzip)."""
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"file is larger than the {limit}-byte limit (max_file_bytes)")
    if not data:
        raise EmptyFile("file is empty")
    return data


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


def page_count(data: bytes, fmt: Format, limits: DecodeLimits) -> int:
    """Pages of a PDF or frames of a TIFF, refusing empty and over-long documents."""
    pages = pdf_page_count(data) if fmt is Format.PDF else image_frame_count(data)
    if pages < 1:
        raise NoPages("document has no pages")
    if pages > limits.max_pages:
        raise TooManyPages(f"document has {pages} pages, over the max_pages limit of {limits.max_pages}")
    return pages


def is_paged(fmt: Format, pages: int) -> bool:
    """Whether items of this source carry a page number: every PDF page, and frames of multi-frame images."""
    return fmt is Format.PDF or pages > 1


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


def fit(image: Image.Image, max_side: int) -> Image.Image:
    """`image` downscaled to at most `max_side` pixels on its long side (unchanged when smaller)."""
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


def page_scale(width_pt: float, height_pt: float, limits: DecodeLimits) -> float:
    """Pixels per point a page renders at: `pdf_dpi`, lowered if the page would exceed `max_image_pixels`."""
    scale = limits.pdf_dpi / 72.0
    pixels = width_pt * height_pt * scale * scale
    if pixels > limits.max_image_pixels:
        scale *= (limits.max_image_pixels / pixels) ** 0.5
    return scale


def page_pixels(width_pt: float, height_pt: float, limits: DecodeLimits) -> tuple[int, int]:
    """The size in pixels a page of this size renders to, without rendering it (pypdfium2 rounds up:
    pypdfium2/_helpers/page.py, PdfPage.render)."""
    scale = page_scale(width_pt, height_pt, limits)
    return max(1, math.ceil(width_pt * scale)), max(1, math.ceil(height_pt * scale))


def render_pdf_page(data: bytes, page_index: int, limits: DecodeLimits) -> Image.Image:
    """One PDF page rendered at `pdf_dpi`, lowered if the page would exceed `max_image_pixels`."""
    with _PDFIUM_LOCK:
        document = open_pdf(data)
        try:
            page = document[page_index]
            try:
                width_pt, height_pt = page.get_size()
                scale = page_scale(width_pt, height_pt, limits)
                if width_pt * scale < 1 or height_pt * scale < 1:
                    raise DecodeError(f"page is {width_pt}x{height_pt} pt: too small to render")
                rendered = page.render(scale=scale).to_pil()
            finally:
                page.close()
        finally:
            document.close()
    return to_rgb(rendered)


def render_item(data: bytes, fmt: Format, page: Optional[int], limits: DecodeLimits) -> Image.Image:
    """One item of a file's (or shard member's) bytes as the model sees it: a rendered PDF page or an image frame."""
    if fmt.is_shard:
        raise DecodeError(f"the item is a whole {fmt.value} shard, not one image")
    if fmt is Format.PDF:
        return render_pdf_page(data, page or 0, limits)
    return decode_image_frame(data, page or 0, limits)
