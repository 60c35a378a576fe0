"""OCR baselines run offline on clean pages, write pipeline-schema results, and score through the same evaluator."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from evaluation.pdf_references import pdf_references
from evaluation.storage import match_sources, write_references
from evaluation.text_render import write_rendered_set
from library.formats import DecodeLimits
from pipelines import baselines as baselines_cli
from pipelines import evaluate
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA
from tests.evaluation_data import PARAGRAPHS, make_pdf, small_layout
from tests.gcs_emulator import BUCKET

MAX_CER = 0.1
MODEL_PREFIX = {"tesseract": "tesseract-5.", "rapidocr": "rapidocr-3."}


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    """A clean rendered-text page and a two-page born-digital PDF, with their references."""
    root = tmp_path_factory.mktemp("evalset")
    docs = root / "docs"
    docs.mkdir()
    pdf = make_pdf(docs / "report.pdf")
    # One page of several lines: RapidOCR scales a page's short side up to 736 px, so a
    # two-line strip would cost it more than a fuller page.
    items = write_rendered_set([" ".join(PARAGRAPHS)], str(docs), small_layout())
    items += pdf_references(match_sources([str(pdf)]), DecodeLimits(), "line")
    write_references(str(root / "refs.parquet"), items)
    return root


@pytest.fixture(scope="module")
def baseline_runs(eval_set):
    outputs = {}
    for engine in MODEL_PREFIX:
        outputs[engine] = str(eval_set / engine)
        baselines_cli.main(["--engine", engine, "--input", f"{eval_set}/docs/*", "--output", outputs[engine]])
    return outputs


@pytest.mark.parametrize("engine", sorted(MODEL_PREFIX))
def test_baseline_output_is_a_pipeline_results_table(eval_set, baseline_runs, engine):
    results = pq.read_table(f"{baseline_runs[engine]}/results")
    assert results.schema.remove_metadata().equals(RESULTS_SCHEMA)
    assert pq.read_table(f"{baseline_runs[engine]}/errors").schema.remove_metadata().equals(ERRORS_SCHEMA)
    rows = results.to_pylist()
    assert {row["item_id"] for row in rows} == {
        f"{eval_set}/docs/text0000-clean.png", f"{eval_set}/docs/report.pdf#page=0", f"{eval_set}/docs/report.pdf#page=1",
    }
    for row in rows:
        assert row["task"] == "ocr" and row["model_id"].startswith(MODEL_PREFIX[engine])
        assert row["text"] and row["latency_ms"] > 0 and row["width"] > 0 and len(row["content_hash"]) == 64
        assert row["prompt_tokens"] is None  # not a language model


def test_baselines_read_clean_pages_well(eval_set, baseline_runs, tmp_path, capsys):
    evaluate.main(["--results", baseline_runs["tesseract"], "--results", baseline_runs["rapidocr"],
                   "--references", str(eval_set / "refs.parquet"), "--json", str(tmp_path / "eval.json")])
    print(capsys.readouterr().out)  # the figures, for `pytest -s`
    runs = json.loads((tmp_path / "eval.json").read_text())["runs"]
    for run in runs:
        assert run["overall"]["Detection mAP@[.5:.95]"] is None  # OCR-only runs are not scored on boxes
        assert len(run["ocr_items"]) == 3
        for item in run["ocr_items"]:
            assert item["cer"] < MAX_CER, (run["label"], item)


def test_evaluate_reads_and_writes_gs(gcs, eval_set, baseline_runs, capsys):
    location = gcs.upload(eval_set / "tesseract", f"gs://{BUCKET}/eval/tesseract")
    references = gcs.upload(eval_set / "refs.parquet", f"gs://{BUCKET}/eval/refs.parquet")
    evaluate.main(["--results", location, "--references", references, "--report", f"gs://{BUCKET}/eval/report.md"])
    assert "| OCR CER ↓ |" in capsys.readouterr().out
    report = gcs.client().bucket(BUCKET).blob("eval/report.md").download_as_text()
    assert report.startswith("# Evaluation report") and "report.pdf#page=1" in report


def test_undecodable_inputs_become_error_rows_as_in_the_pipeline(tmp_path):
    write_rendered_set(["Short line"], str(tmp_path / "in"), small_layout())
    (tmp_path / "in" / "broken.png").write_bytes((tmp_path / "in" / "text0000-clean.png").read_bytes()[:200])
    baselines_cli.main(["--engine", "tesseract", "--input", f"{tmp_path}/in/*", "--output", str(tmp_path / "out")])
    [result] = pq.read_table(tmp_path / "out" / "results").to_pylist()
    [error] = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert result["text"] == "Short line"
    assert error["item_id"] == f"{tmp_path}/in/broken.png" and error["stage"] == "decode"
    assert error["model_id"].startswith("tesseract-")
