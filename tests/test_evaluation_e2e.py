"""The whole workflow on the tiny random model: references -> pipeline run -> baseline -> evaluation report.

The model's answers are random, so this checks the machinery (every task
scored, per-item rows, both runs side by side, report written), not scores.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from evaluation.storage import write_references
from evaluation.text_render import write_rendered_set
from pipelines import baselines as baselines_cli
from pipelines import evaluate
from tests.conftest import run_pipeline
from tests.evaluation_data import PARAGRAPHS, small_layout

pytestmark = pytest.mark.engine  # every test here starts the vLLM engine (the fast tier skips them)


def test_evaluating_the_tiny_model_beside_tesseract(tmp_path, private_model_cache, capsys):
    images = str(tmp_path / "images")
    items = write_rendered_set(PARAGRAPHS, images, small_layout())
    # Rendered text has exact text and boxes; captions are added by hand, as a user would.
    items = [dataclasses.replace(item, captions=("a page of printed text",)) for item in items]
    write_references(str(tmp_path / "refs.jsonl"), items)

    summary = run_pipeline("--input", f"{images}/*.png", "--output", str(tmp_path / "tiny"))
    assert summary["accounting"]["balanced"]
    baselines_cli.main(["--engine", "tesseract", "--input", f"{images}/*.png", "--output", str(tmp_path / "tesseract")])

    evaluate.main([
        "--results", str(tmp_path / "tiny"), "--results", str(tmp_path / "tesseract"),
        "--references", str(tmp_path / "refs.jsonl"), "--ignore_labels",
        "--report", str(tmp_path / "eval.md"), "--json", str(tmp_path / "eval.json"),
    ])
    printed = capsys.readouterr().out
    assert "| metric | tiny | tesseract | Δ tesseract − tiny |" in printed

    tiny, tesseract = json.loads((tmp_path / "eval.json").read_text())["runs"]
    for name in ("OCR CER", "OCR WER", "Detection mAP@[.5:.95]", "Detection AP50", "Caption chrF"):
        assert math.isfinite(tiny["overall"][name]) and tiny["overall"][name] >= 0, name
    for task in ("ocr_items", "detect_items", "caption_items"):
        assert len(tiny[task]) == len(PARAGRAPHS), task
    assert tiny["model_ids"] == [summary["model"]["id"]] and tiny["matched_items"] == len(PARAGRAPHS)
    assert tesseract["overall"]["OCR CER"] < tiny["overall"]["OCR CER"]  # a real OCR engine beats random weights
    assert tesseract["overall"]["Caption chrF"] is None and tesseract["detect_items"] == []

    report = (tmp_path / "eval.md").read_text()
    for heading in ("## Scores", "## Runs", "### OCR: highest CER (tiny)", "### Detection: lowest mAP (tiny)",
                    "### Captions: lowest chrF (tiny)", "### OCR CER per item: tesseract vs tiny"):
        assert heading in report, heading
