"""Established OCR engines (Tesseract, RapidOCR) over the pipeline's own items, written as pipeline results.

The items come from the pipeline's decode stage itself (`PlanUnits` and
`DecodeUnits` run as plain function calls), so ids, page numbering, shard
members, PDF rendering, EXIF handling and the `max_image_side` downscale
are the ones the model saw; the rows are built by `schemas.tables`, task `ocr`, with the
engine as `model_id` and its settings as `prompt_version`. The evaluator
cannot tell a baseline from a model run, which is the point.

A simple loop, not a Beam job: evaluation sets are hundreds of pages, and
the engines parallelise internally (Tesseract's OpenMP, ONNX Runtime).
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import io
import shutil
import subprocess
import time
from typing import Iterable, Iterator, Protocol, Union

import numpy as np
from apache_beam import pvalue
from PIL import Image

from evaluation.storage import write_parquet
from library.formats import DecodeLimits
from library.shards import ShardSettings
from schemas.records import ErrorRecord, ImageItem, ParsedAnswer, RunInfo, SourceFile, Stage, TaskCompletion
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA, error_row, result_row
from transforms.decode import DecodeUnits, PlanUnits


class OcrEngine(Protocol):
    model_id: str  # written to every row, e.g. "tesseract-5.3.0"
    settings: str  # written as prompt_version: what would change the output

    def read(self, image: Image.Image) -> str: ...


class Tesseract:
    """The `tesseract` command (Debian tesseract-ocr), one process per image, PNG on stdin."""

    def __init__(self, language: str = "eng", page_segmentation: int = 3):
        binary = shutil.which("tesseract")
        if binary is None:
            raise FileNotFoundError("tesseract is not installed: run scripts/setup_system.sh (Debian tesseract-ocr)")
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
        self._command = [binary, "stdin", "stdout", "-l", language, "--psm", str(page_segmentation)]
        self.model_id = f"tesseract-{version}"
        self.settings = f"-l {language} --psm {page_segmentation}"

    def read(self, image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        done = subprocess.run(self._command, input=buffer.getvalue(), capture_output=True)
        if done.returncode:
            raise RuntimeError(f"tesseract exited with {done.returncode}: {done.stderr.decode(errors='replace')[-500:]}")
        return done.stdout.decode("utf-8").strip()


class RapidOcr:
    """RapidOCR on ONNX Runtime with the detection/recognition models shipped in its wheel (no download)."""

    def __init__(self) -> None:
        from rapidocr import RapidOCR

        self._engine = RapidOCR(params={"Global.log_level": "error"})
        det, rec = self._engine.cfg.Det, self._engine.cfg.Rec
        self.model_id = f"rapidocr-{importlib.metadata.version('rapidocr')}"
        self.settings = f"det {det.ocr_version.value}-{det.model_type.value}, rec {rec.ocr_version.value}-{rec.lang_type.value}"

    def read(self, image: Image.Image) -> str:
        # Lines come back in reading order (top to bottom, left to right).
        return "\n".join(self._engine(np.asarray(image)).txts or ())


ENGINES = {"tesseract": Tesseract, "rapidocr": RapidOcr}


def decoded_items(
    sources: Iterable[SourceFile], limits: DecodeLimits, shards: ShardSettings
) -> Iterator[Union[ImageItem, ErrorRecord]]:
    """The pipeline's decode stage as a loop: every item, or the error record the pipeline would write."""
    planner, decoder = PlanUnits(limits, shards), DecodeUnits(limits, shards)
    for source in sources:
        for unit in planner.process(source):
            if isinstance(unit, pvalue.TaggedOutput):
                yield unit.value
                continue
            for item in decoder.process(unit):
                yield item.value if isinstance(item, pvalue.TaggedOutput) else item


@dataclasses.dataclass(frozen=True)
class BaselineRun:
    output: str
    model_id: str
    items: int  # decoded items
    result_rows: int
    error_rows: int
    seconds: float


def _ocr_row(engine: OcrEngine, item: ImageItem, run: RunInfo) -> dict:
    started = time.perf_counter()
    text = engine.read(item.image)
    completion = TaskCompletion(
        info=item.info, task="ocr", text=text, finish_reason="stop",
        prompt_tokens=0, generated_tokens=0, cached_tokens=0, latency_s=time.perf_counter() - started,
    )
    row = result_row(completion, run, ParsedAnswer(text))
    row.update(prompt_tokens=None, generated_tokens=None, cached_tokens=None, shared_prefix_tokens=None)  # no tokens: not a language model
    return row


def run_baseline(
    engine: OcrEngine, sources: Iterable[SourceFile], output: str, limits: DecodeLimits, shards: ShardSettings
) -> BaselineRun:
    """OCR every item of `sources` with `engine`; write OUT/results/ and OUT/errors/ like the pipeline."""
    started = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run = RunInfo(run_id=f"{engine.model_id}-{stamp}", model_id=engine.model_id, prompt_version=engine.settings)
    results, errors = [], []
    items = 0
    for item in decoded_items(sources, limits, shards):
        if isinstance(item, ErrorRecord):
            errors.append(error_row(item, run))
            continue
        items += 1
        try:
            results.append(_ocr_row(engine, item, run))
        except Exception as exc:  # noqa: BLE001 - one unreadable item is an error row, as in the pipeline
            info = item.info
            failure = ErrorRecord.from_exception(
                info.ref, Stage.ENGINE, exc, task="ocr", content_hash=info.content_hash, metadata=info.metadata
            )
            errors.append(error_row(failure, run))
    output = output.rstrip("/")
    write_parquet(f"{output}/results/part-00000-of-00001.parquet", results, RESULTS_SCHEMA)
    write_parquet(f"{output}/errors/part-00000-of-00001.parquet", errors, ERRORS_SCHEMA)
    return BaselineRun(output, engine.model_id, items, len(results), len(errors), round(time.perf_counter() - started, 3))
