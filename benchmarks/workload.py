"""The benchmark workload: the same generated images, tasks and engine settings for every variant.

Images are generated deterministically (seeded per index) and written as files,
because variant (b) is measured from files to Parquet. Variants that need
decoded pixels get them from the pipeline's own decode stage, so every variant
sees the same pixels, the same prompts and the same engine arguments.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from engine.api import EngineSettings
from library.formats import DecodeLimits
from library.metadata import ItemValues
from library.shards import ShardSettings
from schemas.records import DecodeUnit, ImageItem, UnitKind
from tasks.builtin import BUILTIN_TASKS, DEFAULT_TASKS
from tasks.task import Task, with_overrides
from transforms.decode import DecodeUnits

if TYPE_CHECKING:
    from configuration.options import JobConfig

# Bump when the generator draws different pixels: it names the cache directory.
GENERATOR_VERSION = "1"

# Skewed output budgets, as in real jobs: long transcriptions, short captions, mid-size
# box lists. The random model also stops early at EOS (and the detection grammar closes
# its JSON list) at different points, so requests of one batch finish at different times.
BENCH_MAX_TOKENS: Mapping[str, int] = {"ocr": 192, "caption": 24, "detect": 96}
# The streaming (RSS) check measures memory over many items, not the engine: tiny outputs.
STREAMING_MAX_TOKENS: Mapping[str, int] = {"ocr": 8, "caption": 4, "detect": 16}
STREAMING_PRESET = "tiny-31b"  # the streaming check's model: a tiny dense checkpoint (was "tiny-dense")
# ... and a KV pool small enough to be fully touched early (the reason is in benchmarks/run.py).
STREAMING_KV_BYTES = 32 * 2**20

# The host-bound regime (variants ha..hb0, host): an engine step as cheap as this CPU allows next
# to the host's work per request, as on an accelerator. tiny-12b-unified stands for the recommended
# accelerator model (tpu-v6e-1-gemma4-12b) and is the most host-bound preset here: encoder-free (no
# vision tower: its engine computed an item in ~87 ms of model runner on one core of this box, the
# vision-tower preset tiny-26b-a4b in ~200 ms), while its image processor (Gemma4UnifiedImageProcessor)
# is the heavier of the two (~25 ms per image at 280 tokens against ~9 ms). Gemma 4 at the TPU
# profiles' image budget (280 soft tokens). The 26B-A4B's processor is measured in the host stages.
HOST_PRESET = "tiny-12b-unified"
HOST_OTHER_PROCESSORS = ("tiny-26b-a4b",)
HOST_VISION_TOKENS = 280
# Child-process environment of the host-bound runs. One OpenMP thread: the tiny engine's ops are
# far too small to split over cores, and with the default (one thread per core, pinned) this shared
# 2-core box ran them pathologically slowly. Measured (ha, 30 images): 141.8 s with the default,
# 6.7 s with OMP_NUM_THREADS=1, the same engine steps. It also makes "threads" in the host stages
# mean Python threads, not torch's intra-op pool.
HOST_ENVIRONMENT = {"OMP_NUM_THREADS": "1"}
# ... and page-sized images for the host stages alone: a scan's long side at 300 dpi (A4: 3,508 px)
# is larger than the workload's 1,024, and decode cost grows with it.
HOST_PAGE_IMAGES = 40
HOST_PAGE_SIDE = 2480

_WORDS = (
    "invoice total amount due date account number customer order item quantity price tax "
    "report revenue growth costs quarter annual summary table figure page section note "
    "shipping address phone email reference payment balance credit debit signature approved"
).split()


def _document(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    font_size = int(rng.integers(12, 28))
    font = ImageFont.load_default(size=font_size)
    y = int(rng.integers(8, 40))
    while y < size[1] - font_size:
        line = " ".join(rng.choice(_WORDS, int(rng.integers(2, 9))))
        draw.text((int(rng.integers(8, 48)), y), line, fill="black", font=font)
        y += font_size + int(rng.integers(4, 16))
    return page


def _chart(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(180, 256, 3)))
    draw = ImageDraw.Draw(image)
    bars = int(rng.integers(3, 12))
    width = size[0] // (bars + 1)
    for bar in range(bars):
        top = int(rng.integers(size[1] // 8, size[1] - 10))
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        draw.rectangle((width // 2 + bar * width, top, width // 2 + bar * width + width * 2 // 3, size[1] - 4), fill=colour)
    return image


def _photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, (2, 3)).astype(np.float32)
    pixels = base + xs[..., None] * slope[0] + ys[..., None] * slope[1]
    pixels += rng.normal(0, 12, pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        radius = int(rng.integers(10, max(11, min(size) // 3)))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def draw_image(index: int, seed: int = 0, max_side: int = 1024) -> tuple[Image.Image, str]:
    """Image number `index` and its file format: documents and charts as PNG, photos as JPEG."""
    rng = np.random.default_rng([seed, index])
    long_side = int(rng.integers(max(64, max_side // 3), max_side + 1))
    aspect = float(rng.uniform(0.5, 2.0))
    size = (long_side, max(32, int(long_side / aspect))) if aspect >= 1 else (max(32, int(long_side * aspect)), long_side)
    kind = index % 3
    if kind == 0:
        return _document(rng, size), "png"
    if kind == 1:
        return _chart(rng, size), "png"
    return _photo(rng, size), "jpeg"


def cached_directory(target: pathlib.Path, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """`target`, built once by `build(staging)` and renamed into place, so an interrupted build is never reused."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def make_images(root: pathlib.Path, count: int, seed: int = 0, max_side: int = 1024) -> pathlib.Path:
    """A directory holding exactly `count` generated images (cached)."""

    def build(staging: pathlib.Path) -> None:
        for index in range(count):
            image, fmt = draw_image(index, seed, max_side)
            image.save(staging / f"img_{index:05d}.{'jpg' if fmt == 'jpeg' else fmt}", fmt, quality=85)

    return cached_directory(root / f"images-v{GENERATOR_VERSION}-seed{seed}-side{max_side}-n{count}", build)


def image_files(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(path for path in directory.iterdir() if path.name.startswith("img_"))


def decode_file(decoder: DecodeUnits, path: pathlib.Path) -> ImageItem:
    """One image file -> its ImageItem through the pipeline's own decode stage (read, hash, decode, orient, resize)."""
    unit = DecodeUnit(uri=str(path), kind=UnitKind.IMAGE, first_page=0, end_page=1, page_count=1)
    items = [out for out in decoder.process(unit) if isinstance(out, ImageItem)]
    if len(items) != 1:
        raise RuntimeError(f"benchmark image {path} did not decode")
    return items[0]


def decode_files(paths: Sequence[pathlib.Path], limits: DecodeLimits = DecodeLimits()) -> list[ImageItem]:
    """Files -> ImageItems through the pipeline's own decode stage (same pixels, same content hashes)."""
    decoder = DecodeUnits(limits, ShardSettings())
    return [decode_file(decoder, path) for path in paths]


def task_specs(max_tokens: Mapping[str, int], names: Sequence[str] = DEFAULT_TASKS) -> tuple[Task, ...]:
    """The built-in tasks without the prose tasks' degenerate-answer ladders: the bench model's random answers
    all run to max_tokens, and the designs compared must send the same requests (the peers do not retry)."""
    tasks = (with_overrides(BUILTIN_TASKS[name], max_tokens.get(name)) for name in names)
    return tuple(dataclasses.replace(task, retries=()) if task.output.prose else task for task in tasks)


def instruction(task: Task) -> str:
    """A built-in task's instruction as sent (its template names no item values)."""
    return task.request(ItemValues(None)).instruction


@dataclasses.dataclass(frozen=True)
class Workload:
    """One set of inputs and settings, shared by every variant of a run."""

    images: pathlib.Path  # directory of generated image files
    model_path: str  # checkpoint directory
    model_id: str
    profile: str  # engine profile name (engine/profiles.py)
    max_tokens: Mapping[str, int]
    engine_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # overrides of the profile
    max_in_flight: Optional[int] = None  # overrides the profile's
    vision_tokens: Optional[int] = None  # overrides the profile's image soft-token budget
    beam_options: Sequence[str] = ()  # extra Beam options of the pipeline's command line
    task_vision_tokens: Mapping[str, int] = dataclasses.field(default_factory=dict)  # per-task budgets (benchmarks.budgets)

    def pipeline_argv(self, output: str) -> list[str]:
        """The command line of this pipeline (variant b) for this workload."""
        argv = [
            "--input", f"{self.images}/img_*", "--output", output,
            "--model", self.model_path, "--model_id", self.model_id, "--engine_profile", self.profile,
        ]
        for task, limit in self.max_tokens.items():
            argv += ["--max_tokens", f"{task}={limit}"]
        for key, value in self.engine_args.items():
            argv += ["--engine_arg", f"{key}={_json(value)}"]
        if self.max_in_flight:
            argv += ["--max_in_flight", str(self.max_in_flight)]
        if self.vision_tokens:
            argv += ["--vision_tokens", str(self.vision_tokens)]
        for task, budget in self.task_vision_tokens.items():
            argv += ["--task_vision_tokens", f"{task}={budget}"]
        return argv + list(self.beam_options)

    def job_config(self) -> "JobConfig":
        """Exactly the job the pipeline resolves from `pipeline_argv` (same engine args and tasks for all variants)."""
        from apache_beam.options.pipeline_options import PipelineOptions

        from configuration.options import JobConfig
        from engine.checkpoint_shape import CheckpointShape

        options = PipelineOptions(self.pipeline_argv("unused"))
        checkpoint = CheckpointShape.read(self.model_path)  # as vision_batch.run: the profile is fitted to it
        return JobConfig.from_options(options, self.model_path, self.model_id, True, checkpoint=checkpoint)

    def engine_settings(self, image_first: bool = True) -> EngineSettings:
        return dataclasses.replace(self.job_config().engine, image_first=image_first)

    def specs(self) -> tuple[Task, ...]:
        """The pipeline's tasks, each with the image budget its requests carry (the job's or its own)."""
        return self.job_config().tasks


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def prompt_suffix_tokens(checkpoint: str, specs: Sequence[Task]) -> dict[str, int]:
    """Prompt tokens after the prefix all tasks of an image share (system + image), per task.

    From the checkpoint's own processor, as vLLM tokenizes it. The image's token
    count varies with its aspect ratio but the suffix does not, so a request's
    shared-prefix length is its prompt length minus its task's suffix.
    """
    from transformers import AutoProcessor

    from engine.prompts import render_prompt

    processor = AutoProcessor.from_pretrained(checkpoint)
    template = processor.tokenizer.apply_chat_template
    texts = {task.name: render_prompt(instruction(task), template) for task in specs}
    image = Image.new("RGB", (320, 240), "white")
    ids = {name: list(processor(text=[text], images=[image])["input_ids"][0]) for name, text in texts.items()}
    shared = next(i for i, tokens in enumerate(zip(*ids.values())) if len(set(tokens)) > 1)
    return {name: len(tokens) - shared for name, tokens in ids.items()}


def checkpoint_parameters(checkpoint: str) -> int:
    """Parameter count from the safetensors headers (no weights loaded)."""
    import struct

    total = 0
    for path in pathlib.Path(checkpoint).glob("*.safetensors"):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        total += sum(int(np.prod(entry["shape"])) for key, entry in header.items() if key != "__metadata__")
    return total
