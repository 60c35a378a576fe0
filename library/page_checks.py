"""Page checks on the host CPU, before the engine: is a document page blank, and which way is up.

Pure functions on decoded pixels (no Beam, no engine), used by the decode
stage (`transforms.decode`) and measured by `benchmarks/page_checks.py`:

- `is_blank`: an ink-coverage check. A page is blank when no cell of it
  holds ink: pixels clearly darker than the paper around them, several in
  one small cell, so scanner noise and dust specks do not count while a
  page number or a faint stamp does. Blank pages get an empty answer
  without an engine request (`transforms.run_tasks`).
- `detect_rotation`: Tesseract's orientation and script detection (OSD,
  `tesseract --psm 0 -l osd`, Debian's tesseract-ocr and tesseract-ocr-osd),
  run as a subprocess so a crash on a strange page cannot take the worker
  with it; where it is unsure (blurred scans, small print), a second look
  at twice the size, checked against the direction of the page's text
  lines (`line_axis`, a projection profile of the ink). It answers the
  clockwise turn (0, 90, 180, 270) that makes the page upright, or 0 when
  it cannot tell.
- `turn_upright` and `box_to_source`: the turn, and its inverse for boxes,
  so a box the model drew on the upright page lands on the source's pixels.

Which items are checked (`is_document`): PDF pages and TIFF frames (scans,
faxes) always; other images only when they look like a page (mostly an even,
light, near-neutral background) and carry no camera EXIF (a photo: its EXIF orientation
already turned it, `library.formats.decode_image_frame`).
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import subprocess
from typing import Optional

import numpy as np
from PIL import Image

from library.formats import Format

ROTATIONS = (0, 90, 180, 270)

# --- blank pages -----------------------------------------------------------------------------------
# Thresholds measured by benchmarks/page_checks.py on pages rendered from Debian's manuals and
# made scan-like (paper tint, uneven light, grain, dust, blur, JPEG): BENCHMARKS.md, "Page checks".
CHECK_MAX_SIDE = 1700  # px: pages are checked at about 150 dpi (a letter page's long side is 1,650 px there)
_TILE = 32  # px: the paper's level is taken per tile, so uneven light is not ink
_MIN_CONTRAST = 24.0  # grey levels below the paper that count as ink at the least (a faint stamp is ~60)
_NOISE_SIGMAS = 5.0  # ... or this many times the paper's grain, whichever is more
_WINDOW = 16  # px (2.7 mm at 150 dpi): ink is counted in every window of this side
# Ink pixels in one window that make a mark. Measured: dust and grain on blank scans reach at most
# 11; a page number at least 55, a faint stamp 97 (one digit of 8 pt at 150 dpi is ~20).
MARK_PIXELS = 16
_EDGE = 0.02  # of each side ignored: scanner borders and shadows, not content (a page number sits further in)


def checked_grey(image: Image.Image) -> Image.Image:
    """The page in grey at the scale both checks read it: at most CHECK_MAX_SIDE on its long side."""
    grey = image.convert("L")
    if max(grey.size) > CHECK_MAX_SIDE:
        grey.thumbnail((CHECK_MAX_SIDE, CHECK_MAX_SIDE), Image.Resampling.BOX)
    return grey


def _tiles(array: np.ndarray, size: int) -> np.ndarray:
    """`array` cropped to whole tiles and viewed as (rows, size, columns, size)."""
    rows, columns = array.shape[0] // size, array.shape[1] // size
    return array[: rows * size, : columns * size].reshape(rows, size, columns, size)


def ink(grey: Image.Image) -> np.ndarray:
    """Boolean mask of ink: pixels clearly darker than the paper around them (edges left out)."""
    pixels = np.asarray(grey, dtype=np.float32)
    height, width = pixels.shape
    top, left = int(height * _EDGE), int(width * _EDGE)
    pixels = pixels[top: height - top, left: width - left]
    if min(pixels.shape) < _TILE:
        return np.zeros((0, 0), dtype=bool)
    tiles = _tiles(pixels, _TILE)
    # The paper's level per tile: a high percentile (text covers well under a tenth of a tile),
    # then the brightest of each tile's neighbours, so a tile a dark mark fills still sees the paper.
    flat = tiles.transpose(0, 2, 1, 3).reshape(tiles.shape[0], tiles.shape[2], -1)
    paper = np.percentile(flat, 90, axis=2)
    padded = np.pad(paper, 1, mode="edge")
    paper = np.max([padded[dy: dy + paper.shape[0], dx: dx + paper.shape[1]] for dy in range(3) for dx in range(3)], axis=0)
    rows, columns = paper.shape[0] * _TILE, paper.shape[1] * _TILE
    below = np.repeat(np.repeat(paper, _TILE, axis=0), _TILE, axis=1) - pixels[:rows, :columns]
    # The paper's grain: the spread of the pixels near its level (median absolute deviation, as a sigma).
    near = below[below < _MIN_CONTRAST]
    grain = 1.4826 * float(np.median(np.abs(near - np.median(near)))) if near.size else 0.0
    return below > max(_MIN_CONTRAST, _NOISE_SIGMAS * grain)


def largest_mark(grey: Image.Image) -> int:
    """The most ink pixels in any _WINDOW x _WINDOW window of the page (a summed-area table)."""
    mask = ink(grey)
    if min(mask.shape) < _WINDOW:
        return 0
    table = np.pad(mask.astype(np.int32).cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
    w = _WINDOW
    sums = table[w:, w:] - table[:-w, w:] - table[w:, :-w] + table[:-w, :-w]
    return int(sums.max())


def is_blank(grey: Image.Image) -> bool:
    """No mark anywhere on the page (`checked_grey`'s): a page number, a faint stamp or one word is a mark."""
    return largest_mark(grey) < MARK_PIXELS


# --- which items are pages -------------------------------------------------------------------------
_EXIF_CAMERA_TAGS = (0x010F, 0x0110, 0x0112)  # Make, Model, Orientation (EXIF 2.32, TIFF tags)
_PAGE_BACKGROUND = 0.5  # of the pixels within _PAGE_SPREAD levels of one light level: paper
_PAGE_SPREAD = 24
_LIGHT = 128
# Paper is near-neutral: the median pixel's chroma (max - min of R, G, B) stays under this. A scanner's
# paper tint (benchmarks/page_checks.py `scan_like`: each channel scaled by 0.88-1.0, at most ~31
# levels on white) is well below it; a plain coloured picture (yellow 250,250,0: 250) far above.
_PAPER_CHROMA = 48


def has_camera_exif(data: bytes) -> bool:
    """The image's EXIF names a camera or an orientation: a photo. Reads the header only."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            exif = image.getexif()
    except Exception:  # noqa: BLE001 - unreadable headers are the decoder's to report
        return False
    return any(tag in exif for tag in _EXIF_CAMERA_TAGS)


def looks_like_page(image: Image.Image, grey: Image.Image) -> bool:
    """Most of the image is one even, light, near-neutral level: paper (a scan, a screenshot of a document),
    not a scene, and not a coloured surface (a plain yellow picture is a picture: its question goes to the model)."""
    counts = np.bincount(np.asarray(grey).ravel(), minlength=256)
    level = _LIGHT + int(np.argmax(counts[_LIGHT:]))
    near = counts[max(0, level - _PAGE_SPREAD): level + _PAGE_SPREAD + 1].sum()
    if near < _PAGE_BACKGROUND * counts.sum():
        return False
    small = image.convert("RGB")
    small.thumbnail((CHECK_MAX_SIDE // 8, CHECK_MAX_SIDE // 8))
    rgb = np.asarray(small, dtype=np.int16)
    return float(np.median(rgb.max(axis=2) - rgb.min(axis=2))) <= _PAPER_CHROMA


def is_document(fmt: Format, data: bytes, image: Image.Image, grey: Image.Image) -> bool:
    """Whether the page checks apply: PDF pages and TIFF frames; other images that look like a page and are no photo."""
    if fmt in (Format.PDF, Format.TIFF):
        return True
    return looks_like_page(image, grey) and not has_camera_exif(data)


# --- orientation ----------------------------------------------------------------------------------
# Tesseract's OSD reads characters of a normal size: pages are given to it first as `checked_grey`
# makes them (about 150 dpi, larger scans downscaled). At 100 dpi its confidence halved and at
# 75 dpi it answered wrongly on a page of R-intro.pdf.
# Below this "Orientation confidence" an answer is not acted on (the page stays as it is):
# measured on Debian's manuals, BENCHMARKS.md "Page checks".
OSD_MIN_CONFIDENCE = 2.0
# At or above this confidence the first look (~150 dpi) is taken as it is. Measured
# (benchmarks/page_checks.py, BENCHMARKS.md "Page checks"): its wrong answers reached 3.99 (a
# scan-like page of R code, refman.pdf page 603, standing upright, answered 180) and 2.95, while
# most right ones on clean pages are above 10; below it, the page gets a second look.
OSD_SURE_CONFIDENCE = 5.0
# The second look: the page scaled up this many times (bicubic), about 300 dpi, the resolution
# Tesseract is made for (tesseract-ocr.github.io/tessdoc/ImproveQuality: "at least 300 dpi").
# Measured on 24 pages x 4 turns, half scan-like (BENCHMARKS.md "Page checks"): OSD's answer at 2x
# was right on all 96 whatever its confidence (on scan-like pages about twice the first look's),
# against 89 at 150 dpi, 92 at 1.5x, and 61 on the page binarised first (`ink`: blurred strokes
# break apart). It costs about 1.5x the first look's CPU (1.1 CPU-s against 0.71 per page, 80-page run),
# so only unsure pages get it.
OSD_SECOND_LOOK_SCALE = 2
# Text lines (`line_axis`): log of the row profile's roughness over the column profile's. Rendered
# and scan-like text pages measured |2.5|-|3.9|, a page of R code and formulas 0.74; beyond this,
# the lines' direction is taken as known (a page whose OSD answers are too weak to act on, but
# whose lines run up and down, is turned by OSD's answer of 90 or 270: it is not upright anyway).
LINE_AXIS_SURE = 1.5
OSD_TIMEOUT_S = 60.0
_ROTATE = re.compile(r"^Rotate:\s*(\d+)", re.MULTILINE)
_CONFIDENCE = re.compile(r"^Orientation confidence:\s*([-\d.]+)", re.MULTILINE)


class OrientationUnavailable(RuntimeError):
    """Tesseract or its OSD model is missing where pages are to be turned upright."""


@dataclasses.dataclass(frozen=True)
class OsdLook:
    """One answer of Tesseract's OSD: the page read at `scale` times `checked_grey`'s size."""

    scale: int
    rotation: int  # Tesseract's `Rotate`: clockwise degrees that turn the page upright
    confidence: float  # its "Orientation confidence"


@dataclasses.dataclass(frozen=True)
class Orientation:
    rotation: int  # clockwise degrees that turn the page upright: 0, 90, 180 or 270
    confidence: Optional[float]  # OSD's confidence in the answer acted on (or the last look's); None: no look could tell
    looks: tuple[Optional[OsdLook], ...] = ()  # each OSD run in order (None: it refused the page, too little text)
    line_axis: Optional[float] = None  # `line_axis` of the page, computed only when the looks were unsure


def require_osd() -> None:
    """Raise OrientationUnavailable unless `tesseract` and its `osd` model are installed here."""
    binary = shutil.which("tesseract")
    if binary is None:
        raise OrientationUnavailable(
            "turning pages upright needs Tesseract's OSD: install tesseract-ocr and tesseract-ocr-osd "
            "(scripts/setup_system.sh; the worker image has them), or run with --upright_pages off"
        )
    listed = subprocess.run([binary, "--list-langs"], capture_output=True, text=True, timeout=30)
    if "osd" not in (listed.stdout + listed.stderr).split():
        raise OrientationUnavailable(
            "Tesseract has no osd model: install tesseract-ocr-osd, or run with --upright_pages off"
        )


def _pgm(grey: Image.Image) -> bytes:
    buffer = io.BytesIO()
    grey.save(buffer, "PPM")  # binary PGM for mode L: no compression to spend time on, Leptonica reads it
    return buffer.getvalue()


def parse_osd(output: str) -> Optional[tuple[int, float]]:
    """(Rotate, Orientation confidence) from `tesseract --psm 0` output; None when it holds no answer."""
    rotate, confidence = _ROTATE.search(output), _CONFIDENCE.search(output)
    if rotate is None or confidence is None or int(rotate.group(1)) not in ROTATIONS:
        return None
    return int(rotate.group(1)), float(confidence.group(1))


def osd_look(grey: Image.Image, scale: int = 1) -> Optional[OsdLook]:
    """Tesseract's OSD on `grey` scaled `scale` times; None when it cannot tell (too few characters, a crash, a timeout).

    Tesseract prints `Rotate: N`, the clockwise degrees that correct the
    page (tesseract src/api/baseapi.cpp, GetOsdText), and refuses pages with
    too few characters (exit status 1).
    """
    if scale != 1:
        grey = grey.resize((grey.width * scale, grey.height * scale), Image.Resampling.BICUBIC)
    # One OpenMP thread: pages are checked in parallel by the worker's threads and processes
    # (Tesseract's FAQ recommends OMP_THREAD_LIMIT=1 when running several at once).
    environment = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    try:
        done = subprocess.run(
            ["tesseract", "stdin", "stdout", "--psm", "0", "-l", "osd"], input=_pgm(grey),
            capture_output=True, timeout=OSD_TIMEOUT_S, env=environment,
        )
    except subprocess.TimeoutExpired:
        return None
    found = parse_osd(done.stdout.decode(errors="replace")) if done.returncode == 0 else None
    return None if found is None else OsdLook(scale, *found)


def _roughness(profile: np.ndarray) -> float:
    """Mean squared step of an ink profile over its mean squared, within its inked span: high where lines and gaps alternate."""
    inked = np.flatnonzero(profile)
    if inked.size < 2:
        return 0.0
    span = profile[inked[0]: inked[-1] + 1].astype(np.float64)
    return float(np.mean(np.diff(span) ** 2) / np.mean(span) ** 2)


def line_axis(grey: Image.Image) -> float:
    """Which way the page's text lines run: log(row profile's roughness / column profile's) of its ink.

    Lines running across the page (upright or upside down) make the ink
    per row swing between line and gap while the ink per column stays
    even: positive. Lines running up and down (the page on its side):
    negative. Near 0: no text lines to tell (a figure, scattered code).
    """
    mask = ink(grey)
    rows, columns = _roughness(mask.sum(axis=1)), _roughness(mask.sum(axis=0))
    if rows == 0.0 or columns == 0.0:
        return 0.0
    return float(np.log(rows / columns))


def detect_rotation(grey: Image.Image, min_confidence: float = OSD_MIN_CONFIDENCE) -> Orientation:
    """The clockwise turn that makes the page upright; 0 when the evidence is too weak to turn it.

    `grey`: the page as `checked_grey` gives it. A first look by OSD at
    that size is taken when it is sure (OSD_SURE_CONFIDENCE). Otherwise a
    second look at OSD_SECOND_LOOK_SCALE times the size is taken when its
    confidence reaches `min_confidence`, and its answer's axis does not
    contradict the text lines (`line_axis`). When neither look is confident
    enough, a page whose text lines clearly run up and down is turned by
    the looks' answer of 90 or 270 (it cannot be upright). An upright page
    is thus turned only on a confident OSD answer that its lines do not
    contradict.
    """
    first = osd_look(grey)
    if first is not None and first.confidence >= OSD_SURE_CONFIDENCE:
        return Orientation(first.rotation, first.confidence, (first,))
    second = osd_look(grey, OSD_SECOND_LOOK_SCALE)
    looks = (first, second)
    lines = line_axis(grey)
    across = lines >= LINE_AXIS_SURE  # lines run across: the answer is 0 or 180
    sideways = lines <= -LINE_AXIS_SURE  # lines run up and down: the answer is 90 or 270

    def fits(look: OsdLook) -> bool:
        return not ((across and look.rotation in (90, 270)) or (sideways and look.rotation in (0, 180)))

    if second is not None and second.confidence >= min_confidence and fits(second):
        return Orientation(second.rotation, second.confidence, looks, lines)
    if sideways:
        for look in (second, first):
            if look is not None and look.rotation in (90, 270):
                return Orientation(look.rotation, look.confidence, looks, lines)
    last = second or first
    return Orientation(0, None if last is None else last.confidence, looks, lines)


def turn_upright(image: Image.Image, rotation: int) -> Image.Image:
    """`image` turned `rotation` degrees clockwise (PIL's rotations are counter-clockwise)."""
    if rotation == 0:
        return image
    return image.transpose({90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}[rotation])


def box_to_source(box: tuple[float, float, float, float], rotation: int) -> tuple[float, float, float, float]:
    """A box (ymin, xmin, ymax, xmax, fractions 0-1) on the page turned `rotation` clockwise -> the same box on the source.

    A source point (u, v) (fractions of width and height) is at
    (1 - v, u) once turned 90 degrees clockwise, (1 - u, 1 - v) at 180,
    (v, 1 - u) at 270; each corner goes back by the inverse, and the
    corners are put in order again.
    """
    ymin, xmin, ymax, xmax = box
    if rotation == 0:
        return box
    if rotation == 90:
        corners = [(y, 1.0 - x) for y, x in ((ymin, xmin), (ymax, xmax))]  # (u, v) = (y', 1 - x')
    elif rotation == 180:
        corners = [(1.0 - x, 1.0 - y) for y, x in ((ymin, xmin), (ymax, xmax))]
    elif rotation == 270:
        corners = [(1.0 - y, x) for y, x in ((ymin, xmin), (ymax, xmax))]  # (u, v) = (1 - y', x')
    else:
        raise ValueError(f"rotation {rotation} is not one of {ROTATIONS}")
    us, vs = sorted(u for u, _ in corners), sorted(v for _, v in corners)
    return vs[0], us[0], vs[1], us[1]


# --- both, as the decode stage runs them ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PageCheck:
    """What the checks found on one item."""

    blank: bool = False  # no mark on the page: it is answered without the engine
    rotation: int = 0  # clockwise degrees the item was turned to be upright


def check_page(image: Image.Image, fmt: Format, data: bytes, skip_blank: bool, upright: bool) -> tuple[Image.Image, PageCheck]:
    """The item as the model should see it, and what was found: blank pages are not turned, photos not checked.

    `data`: the item's file (or member) bytes, for its EXIF; `skip_blank`
    and `upright`: the job's options (`--skip_blank_pages`, `--upright_pages`).
    """
    if not (skip_blank or upright):
        return image, PageCheck()
    grey = checked_grey(image)
    if not is_document(fmt, data, image, grey):
        return image, PageCheck()
    if skip_blank and is_blank(grey):
        return image, PageCheck(blank=True)
    rotation = detect_rotation(grey).rotation if upright else 0
    return turn_upright(image, rotation), PageCheck(rotation=rotation)
