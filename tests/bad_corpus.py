"""A corpus of bad and odd inputs, each with the outcome the pipeline must produce.

Every case is one input file (or shard) and says how many items must come
out as results and which (stage, error_type) error rows must come out for
it. Nothing else may appear and nothing may go missing.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import pathlib
from typing import Callable

import numpy as np
from PIL import Image

from tests.shard_data import encode, parquet_bytes, tar_bytes

EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass(frozen=True)
class Case:
    path: str  # relative to the corpus root
    ok_items: int  # items expected in the results
    errors: tuple[tuple[str, str], ...] = ()  # (stage, error_type) rows expected for this file


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    """Incompressible pixels, so truncating the encoded file really cuts image data."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _zero_page_pdf() -> bytes:
    """A well-formed PDF whose page tree is empty (PDFium refuses to open it)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [] /Count 0 >>"]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def _pdf(pages: int, size=(200, 120)) -> bytes:
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument.new()
    for _ in range(pages):
        document.new_page(*size)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def _encrypted_pdf() -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(text="secret")
    pdf.set_encryption(owner_password="owner", user_password="user")
    return bytes(pdf.output())


def _exif_rotated() -> bytes:
    image = Image.new("RGB", (300, 100), "white")
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = 6
    return encode(image, "JPEG", exif=exif)


def _palette_alpha() -> bytes:
    image = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    image.paste((200, 30, 30, 255), (10, 10, 40, 30))
    return encode(image.convert("P"), "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [Image.new("P", (40, 30), color) for color in (1, 2, 3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _multipage_tiff() -> bytes:
    pages = [Image.new("L", (80, 60), shade) for shade in (0, 128, 255)]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _png(color=(20, 120, 220), size=(64, 48)) -> bytes:
    return encode(Image.new("RGB", size, color), "PNG")


JPEG = encode(_noise((120, 90), 1), "JPEG", quality=90)
PNG_NOISE = encode(_noise((96, 72), 2), "PNG")
SAMPLE_JSON = json.dumps({"caption": "a blue square"}).encode()

BUILDERS: dict[str, Callable[[], bytes]] = {
    "empty.png": lambda: b"",
    "truncated.jpg": lambda: JPEG[: len(JPEG) // 2],
    "truncated.png": lambda: PNG_NOISE[: len(PNG_NOISE) // 2],
    "png_named.jpg": _png,
    "drawing.svg": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="5" height="5"/></svg>',
    "photo.heic": lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
    "bomb.png": lambda: encode(Image.new("1", (20000, 20000)), "PNG"),  # past PIL's own guard
    "bomb_below_pil_limit.png": lambda: encode(Image.new("1", (9000, 9000)), "PNG"),  # 81 M pixels: ours only
    "one_pixel.png": lambda: _png(size=(1, 1)),
    "strip.png": lambda: _png(size=(20000, 200)),
    "sixteen_bit.png": lambda: encode(Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20), "PNG"),
    "cmyk.jpg": lambda: encode(Image.new("CMYK", (64, 48), (0, 100, 200, 0)), "JPEG"),
    "palette_alpha.png": _palette_alpha,
    "la.png": lambda: encode(Image.new("LA", (64, 48), (90, 128)), "PNG"),
    "animated.gif": _animated_gif,
    "exif_rotated.jpg": _exif_rotated,
    "multipage.tiff": _multipage_tiff,
    "scan.bmp": lambda: encode(Image.new("RGB", (50, 40), "green"), "BMP"),
    "pdf_named.png": lambda: _pdf(2),
    "corrupt.pdf": lambda: b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF",
    "encrypted.pdf": _encrypted_pdf,
    "zero_pages.pdf": _zero_page_pdf,
    "thousands_of_pages.pdf": lambda: _pdf(2000, (20, 20)),
    "notes.txt": lambda: b"just words, not an image\n" * 20,
    "random.gz": lambda: gzip.compress(b"not a tar, not an image" * 50),
    "dir with space/ünïcødé name.png": lambda: _png((1, 2, 3)),
    "dups/first.png": lambda: _png((7, 7, 7)),
    "dups/second copy.png": lambda: _png((7, 7, 7)),
    "shards/missing_image.tar": lambda: tar_bytes([
        ("s/a.png", _png((1, 1, 1))), ("s/a.json", SAMPLE_JSON), ("s/b.json", SAMPLE_JSON), ("s/c.png", _png((2, 2, 2))),
    ]),
    "shards/non_image.tar": lambda: tar_bytes([
        ("s/a.png", _png((3, 3, 3))), ("s/a.bin", b"\x00\x01"), ("s/b.bin", b"\x02\x03"),
    ]),
    "shards/truncated.tar": lambda: tar_bytes([("s/a.png", _png((4, 4, 4))), ("s/b.png", PNG_NOISE)])[:1024 + 512 + 300],
    "shards/truncated.tar.gz": lambda: tar_bytes([("s/a.png", PNG_NOISE), ("s/b.png", PNG_NOISE)], "w:gz")[:400],
    "shards/empty.tar": lambda: tar_bytes([]),
    "shards/null_bytes.parquet": lambda: parquet_bytes({"id": ["r1", "r2"], "image": [_png((5, 5, 5)), None]}),
    "shards/no_image_column.parquet": lambda: parquet_bytes({"id": ["r1"], "picture": [_png()]}),
}

MAX_PAGES = 1000  # the corpus runs with --max_pages 1000, so the 2000-page PDF is refused

CASES: tuple[Case, ...] = (
    Case("empty.png", 0, (("plan", "EmptyFile"),)),
    Case("truncated.jpg", 0, (("decode", "TruncatedImage"),)),
    Case("truncated.png", 0, (("decode", "TruncatedImage"),)),
    Case("png_named.jpg", 1),
    Case("drawing.svg", 0, (("decode", "UnsupportedFormat"),)),
    Case("photo.heic", 0, (("decode", "UnsupportedFormat"),)),
    Case("bomb.png", 0, (("decode", "ImageTooLarge"),)),
    Case("bomb_below_pil_limit.png", 0, (("decode", "ImageTooLarge"),)),
    Case("one_pixel.png", 1),
    Case("strip.png", 1),
    Case("sixteen_bit.png", 1),
    Case("cmyk.jpg", 1),
    Case("palette_alpha.png", 1),
    Case("la.png", 1),
    Case("animated.gif", 1),
    Case("exif_rotated.jpg", 1),
    Case("multipage.tiff", 3),
    Case("scan.bmp", 1),
    Case("pdf_named.png", 2),
    Case("corrupt.pdf", 0, (("plan", "UnreadablePdf"),)),
    Case("encrypted.pdf", 0, (("plan", "EncryptedPdf"),)),
    Case("zero_pages.pdf", 0, (("plan", "NoPages"),)),
    Case("thousands_of_pages.pdf", 0, (("plan", "TooManyPages"),)),
    Case("notes.txt", 0, (("decode", "UnsupportedFormat"),)),
    Case("random.gz", 0, (("decode", "UnsupportedFormat"),)),
    Case("dir with space/ünïcødé name.png", 1),
    Case("dups/first.png", 1),
    Case("dups/second copy.png", 1),
    Case("shards/missing_image.tar", 2, (("plan", "MissingImage"),)),
    Case("shards/non_image.tar", 1, (("plan", "MissingImage"),)),
    Case("shards/truncated.tar", 1, (("plan", "TruncatedShard"),)),
    Case("shards/truncated.tar.gz", 0, (("plan", "TruncatedShard"),)),
    Case("shards/empty.tar", 0, (("plan", "EmptyShard"),)),
    Case("shards/null_bytes.parquet", 1, (("decode", "MissingImage"),)),
    Case("shards/no_image_column.parquet", 0, (("plan", "MissingColumn"),)),
)


def build(root: pathlib.Path) -> pathlib.Path:
    for relative, builder in BUILDERS.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(builder())
    assert {case.path for case in CASES} == set(BUILDERS), "every file has an expected outcome"
    return root
