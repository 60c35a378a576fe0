"""References from rendered text: known text drawn with a real font, optionally degraded.

Drawing the text ourselves makes the reference exact (every character and
every word's box is known) and lets the same text be scored clean and
after the damage scans suffer (blur, sensor noise, skew, JPEG artefacts),
so a model's robustness can be compared with the OCR baselines'.
"""
from __future__ import annotations

import dataclasses
import io
import math
import pathlib
import shutil
import subprocess
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from evaluation.storage import write_bytes
from schemas.records import ItemRef
from schemas.references import GRANULARITIES, TEXT_REGION_LABEL, ReferenceBox, ReferenceItem

ORIGIN = "render-text"
# Debian's fonts-dejavu-core (scripts/setup_system.sh installs it); fc-match finds others.
KNOWN_FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf")

PixelBox = tuple[float, float, float, float]  # left, top, right, bottom in pixels


def find_font(family: str = "DejaVu Sans") -> str:
    """Path of an installed TrueType font: fontconfig's match for `family`, else a known DejaVu path."""
    if shutil.which("fc-match"):
        found = subprocess.run(["fc-match", "-f", "%{file}", family], capture_output=True, text=True).stdout.strip()
        if found.endswith((".ttf", ".otf")) and pathlib.Path(found).is_file():
            return found
    for path in KNOWN_FONTS:
        if pathlib.Path(path).is_file():
            return path
    raise FileNotFoundError(f"no TrueType font for {family!r}; run scripts/setup_system.sh (fonts-dejavu-core)")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How text is set: a page `width` pixels wide, wrapped at the margins."""

    font_path: str
    font_size: int = 28
    width: int = 1000
    margin: int = 40
    line_spacing: float = 1.5


@dataclasses.dataclass(frozen=True)
class Word:
    text: str
    box: PixelBox
    line: int


@dataclasses.dataclass(frozen=True)
class RenderedText:
    """An image and the exact text and word boxes drawn on it."""

    image: Image.Image
    text: str  # lines joined with "\n"
    words: tuple[Word, ...]


def _wrap(words: Sequence[str], font: ImageFont.FreeTypeFont, width: float) -> list[list[str]]:
    lines: list[list[str]] = [[]]
    for word in words:
        candidate = " ".join(lines[-1] + [word])
        if lines[-1] and font.getlength(candidate) > width:
            lines.append([])
        lines[-1].append(word)
    return [line for line in lines if line]


def render_paragraph(text: str, layout: Layout) -> RenderedText:
    """`text` reflowed into lines that fit the page, drawn black on white, word by word.

    A word too long for a line gets a wider page rather than being cut off.
    """
    font = ImageFont.truetype(layout.font_path, layout.font_size)
    lines = _wrap(text.split(), font, layout.width - 2 * layout.margin)
    pitch = round(layout.font_size * layout.line_spacing)
    widest = max((font.getlength(" ".join(line)) for line in lines), default=0.0)
    width = max(layout.width, math.ceil(widest) + 2 * layout.margin)
    image = Image.new("RGB", (width, 2 * layout.margin + pitch * max(1, len(lines))), "white")
    draw = ImageDraw.Draw(image)
    space = font.getlength(" ")
    words = []
    for number, line in enumerate(lines):
        x, y = float(layout.margin), float(layout.margin + number * pitch)
        for word in line:
            draw.text((x, y), word, font=font, fill="black")
            words.append(Word(text=word, box=draw.textbbox((x, y), word, font=font), line=number))
            x += font.getlength(word) + space
    return RenderedText(image=image, text="\n".join(" ".join(line) for line in lines), words=tuple(words))


DEGRADATIONS = ("blur", "noise", "rotate", "jpeg")


@dataclasses.dataclass(frozen=True)
class Degradation:
    """Damage applied in order, e.g. `rotate=2,blur=1.2,noise=8,jpeg=40`; empty = clean.

    blur: Gaussian radius in pixels; noise: Gaussian sigma in grey levels;
    rotate: degrees counter-clockwise (the page grows to keep every corner);
    jpeg: JPEG quality 1-95.
    """

    steps: tuple[tuple[str, float], ...] = ()

    @staticmethod
    def parse(spec: str) -> "Degradation":
        steps = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if part == "clean":
                continue
            name, _, value = part.partition("=")
            if name not in DEGRADATIONS or not value:
                raise ValueError(f"bad degradation {part!r}: use NAME=VALUE with NAME in {DEGRADATIONS}")
            steps.append((name, float(value)))
        return Degradation(tuple(steps))

    @property
    def name(self) -> str:
        """File-name-safe: `clean`, `rotate2-blur1.2`."""
        return "-".join(f"{name}{value:g}" for name, value in self.steps) or "clean"


def _rotate_point(x: float, y: float, image: Image.Image, angle: float, rotated: Image.Image) -> tuple[float, float]:
    """Where PIL's `rotate(angle, expand=True)` moves pixel position (x, y)."""
    cx, cy = image.width / 2, image.height / 2
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    dx, dy = x - cx, y - cy
    return rotated.width / 2 + dx * cos + dy * sin, rotated.height / 2 - dx * sin + dy * cos


def _rotate(rendered: RenderedText, angle: float) -> RenderedText:
    image = rendered.image
    rotated = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor="white")
    words = []
    for word in rendered.words:
        left, top, right, bottom = word.box
        corners = [_rotate_point(x, y, image, angle, rotated) for x in (left, right) for y in (top, bottom)]
        xs, ys = zip(*corners)
        words.append(dataclasses.replace(word, box=(min(xs), min(ys), max(xs), max(ys))))
    return RenderedText(image=rotated, text=rendered.text, words=tuple(words))


def _jpeg(image: Image.Image, quality: float) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(quality))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, sigma, (image.height, image.width, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def degrade(rendered: RenderedText, degradation: Degradation, rng: np.random.Generator) -> RenderedText:
    """`rendered` after each step of `degradation`; word boxes follow the geometry (rotation)."""
    for name, value in degradation.steps:
        if name == "rotate":
            rendered = _rotate(rendered, value)
            continue
        if name == "blur":
            image = rendered.image.filter(ImageFilter.GaussianBlur(value))
        elif name == "noise":
            image = _noise(rendered.image, value, rng)
        else:
            image = _jpeg(rendered.image, value)
        rendered = dataclasses.replace(rendered, image=image)
    return rendered


def reference_boxes(rendered: RenderedText, granularity: str = "line") -> tuple[ReferenceBox, ...]:
    """Word boxes, or per-line unions of them, as 0-1 `ReferenceBox`es labelled "text"."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    groups: list[list[Word]] = []
    for word in rendered.words:
        if granularity == "word" or not groups or groups[-1][0].line != word.line:
            groups.append([])
        groups[-1].append(word)
    width, height = rendered.image.size
    boxes = []
    for words in groups:
        lefts, tops, rights, bottoms = zip(*(w.box for w in words))
        box = (max(0.0, min(tops) / height), max(0.0, min(lefts) / width),
               min(1.0, max(bottoms) / height), min(1.0, max(rights) / width))
        boxes.append(ReferenceBox(label=TEXT_REGION_LABEL, box=box, text=" ".join(w.text for w in words)))
    return tuple(boxes)


def paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs of a text file, each reflowed to single spaces."""
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.strip():
            blocks[-1].append(line.strip())
        elif blocks[-1]:
            blocks.append([])
    return [" ".join(block) for block in blocks if block]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_rendered_set(
    texts: Iterable[str],
    output_dir: str,
    layout: Layout,
    degradations: Sequence[Degradation] = (Degradation(),),
    granularity: str = "line",
    seed: int = 0,
) -> list[ReferenceItem]:
    """Every text under every degradation as `OUTPUT/textNNNN-<degradation>.png`, and their references.

    PNG whatever the damage (a JPEG step is applied in memory), so the file
    holds exactly the pixels the references describe. The same seed gives
    the same pixels.
    """
    rng = np.random.default_rng(seed)
    items = []
    for index, text in enumerate(texts):
        clean = render_paragraph(text, layout)
        for degradation in degradations:
            page = degrade(clean, degradation, rng)
            uri = f"{output_dir.rstrip('/')}/text{index:04d}-{degradation.name}.png"
            write_bytes(uri, png_bytes(page.image))
            items.append(
                ReferenceItem(
                    ref=ItemRef.make(uri),
                    width=page.image.width,
                    height=page.image.height,
                    text=page.text,
                    boxes=reference_boxes(page, granularity),
                    origin=f"{ORIGIN}:{degradation.name}",
                )
            )
    return items
