"""Regenerate the bundled sample inputs in data/samples/ (deterministic, offline).

    .venv/bin/python scripts/make_samples.py

A mix of what the pipeline reads: PNG, JPEG with an EXIF rotation, WebP, a
two-page TIFF and a three-page PDF, each small (a few KiB) so they live in git.
"""
from __future__ import annotations

import pathlib

from PIL import Image, ImageDraw, ImageFont

OUT = pathlib.Path(__file__).resolve().parent.parent / "data" / "samples"
EXIF_ORIENTATION = 0x0112


def text_page(lines: list[str], size: tuple[int, int] = (480, 360), font_size: int = 22) -> Image.Image:
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=font_size)
    for row, line in enumerate(lines):
        draw.text((24, 24 + row * (font_size + 10)), line, fill="black", font=font)
    return page


def shapes(size: tuple[int, int] = (400, 300)) -> Image.Image:
    image = Image.new("RGB", size, (200, 225, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((30, 150, 170, 280), fill=(180, 40, 40))
    draw.ellipse((220, 40, 360, 180), fill=(250, 200, 0))
    draw.polygon([(200, 290), (260, 200), (320, 290)], fill=(30, 130, 60))
    return image


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    text_page(["RECEIPT  #1042", "Coffee        3.20", "Bagel         2.80", "TOTAL         6.00"]).save(OUT / "receipt.png")
    photo = shapes()
    exif = photo.getexif()
    exif[EXIF_ORIENTATION] = 6  # stored sideways; viewers (and the pipeline) rotate it upright
    photo.transpose(Image.Transpose.ROTATE_90).save(OUT / "shapes_rotated.jpg", quality=85, exif=exif)
    shapes((320, 240)).save(OUT / "chart.webp", quality=80)
    tiff_pages = [text_page([f"Fax page {n} of 2", "Please sign and return."], (400, 240)).convert("L") for n in (1, 2)]
    tiff_pages[0].save(OUT / "fax.tiff", save_all=True, append_images=tiff_pages[1:], compression="tiff_deflate")
    pdf_pages = [text_page([f"Annual report - page {n}", "Revenue grew 12%.", "Costs fell 3%."], (420, 594)) for n in (1, 2, 3)]
    pdf_pages[0].save(OUT / "report.pdf", save_all=True, append_images=pdf_pages[1:], resolution=72.0)


if __name__ == "__main__":
    main()
