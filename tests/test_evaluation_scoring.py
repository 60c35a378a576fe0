"""Joining runs with references, and the report: missing answers, unattempted tasks, keys, comparisons."""
from __future__ import annotations

import json
import pathlib
from typing import Optional, Sequence

import pytest

from evaluation.runs import load_run
from evaluation.scoring import keyed_references, score_run
from evaluation.storage import write_parquet, write_references
from pipelines import evaluate
from schemas.records import Detection, ErrorRecord, ItemInfo, ItemRef, ParsedAnswer, RunInfo, Stage, TaskCompletion
from schemas.references import ReferenceBox, ReferenceItem
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA, error_row, result_row

BOX = (0.1, 0.1, 0.3, 0.6)
REFERENCES = [
    ReferenceItem(ref=ItemRef.make("/data/a.png"), text="the quick brown fox jumps",
                  boxes=(ReferenceBox("text", BOX),), captions=("a fox jumping",)),
    ReferenceItem(ref=ItemRef.make("/data/b.pdf", page=0), text="second page text", boxes=(ReferenceBox("text", BOX),)),
]


def answer(uri: str, task: str, text: str, page: Optional[int] = None, boxes: Sequence[tuple] = (),
           model: str = "model-x") -> dict:
    info = ItemInfo(ref=ItemRef.make(uri, page=page), width=100, height=100, content_hash="0" * 64)
    completion = TaskCompletion(info=info, task=task, text=text, finish_reason="stop", prompt_tokens=10,
                                generated_tokens=5, cached_tokens=0, latency_s=0.1)
    detections = [Detection("text", tuple(round(v * 1000) for v in b), b, tuple(round(v * 100) for v in b)) for b in boxes]
    parsed = ParsedAnswer(text, tuple(detections) if task == "detect" else None)
    return result_row(completion, RunInfo("run-1", model, "v1"), parsed)


def write_run(out: pathlib.Path, rows: list[dict], errors: Sequence[ErrorRecord] = ()) -> str:
    write_parquet(str(out / "results" / "part-00000-of-00001.parquet"), rows, RESULTS_SCHEMA)
    write_parquet(str(out / "errors" / "part-00000-of-00001.parquet"),
                  [error_row(e, RunInfo("run-1", "model-x", "v1")) for e in errors], ERRORS_SCHEMA)
    return str(out)


def score(location: str, match: str = "item_id"):
    return score_run(load_run(location, match), keyed_references(REFERENCES, match))


def test_missing_answers_score_as_empty_and_unattempted_tasks_are_not_scored(tmp_path):
    # Only item a's OCR is answered, perfectly; b has no row. Corpus CER = (0 + 16) / (25 + 16).
    run = write_run(tmp_path / "run", [answer("/data/a.png", "ocr", "the quick brown fox jumps"),
                                       answer("/data/extra.png", "ocr", "not in the references")])
    scores = score(run)
    assert scores.ocr.cer == pytest.approx(16 / 41)
    assert [(i.item_id, i.missing) for i in scores.ocr_items] == [("/data/a.png", False), ("/data/b.pdf#page=0", True)]
    assert scores.detection is None and scores.caption_chrf is None  # the run never tried them
    assert (scores.matched_items, scores.extra_items) == (1, 1)


def test_failed_task_is_scored_as_a_failure(tmp_path):
    # Every detect answer failed to parse: the errors table says the run tried, so AP is 0, not "not run".
    failures = [ErrorRecord(ref=r.ref, stage=Stage.PARSE, error_type="DetectionParseError", message="x", task="detect")
                for r in REFERENCES]
    run = write_run(tmp_path / "run", [answer("/data/a.png", "ocr", "the quick brown fox jumps")], failures)
    scores = score(run)
    assert scores.detection.map == 0.0 and all(item.missing for item in scores.detect_items)


def test_every_task_scored(tmp_path):
    rows = [
        answer("/data/a.png", "ocr", "the quick brown fox jumps"),
        answer("/data/b.pdf", "ocr", "second page text", page=0),
        answer("/data/a.png", "detect", "", boxes=[BOX]),
        answer("/data/b.pdf", "detect", "", page=0, boxes=[]),
        answer("/data/a.png", "caption", "a fox jumping"),
    ]
    scores = score(write_run(tmp_path / "run", rows))
    assert scores.ocr.cer == 0.0
    # a found its box, b found nothing: 1 of 2 boxes -> 51/101 (see test_evaluation_metrics).
    assert scores.detection.map == pytest.approx(51 / 101)
    assert scores.caption_chrf == pytest.approx(100.0)


def test_markdown_is_scored_like_ocr_once_its_markup_is_removed(tmp_path):
    rows = [
        answer("/data/a.png", "ocr", "the quick fox jumps"),
        answer("/data/a.png", "markdown", "# the **quick** fox\n\n| jumps |"),  # the same words as the ocr answer
        answer("/data/b.pdf", "markdown", "second page text", page=0),
    ]
    scores = score(write_run(tmp_path / "run", rows))
    [ocr_a, _] = scores.ocr_items
    markdown_a, markdown_b = scores.markdown_items
    assert markdown_a.errors == ocr_a.errors and markdown_a.hypothesis.split() == "the quick fox jumps".split()
    assert markdown_b.errors.cer == 0.0 and scores.markdown.cer == pytest.approx(6 / 41)


def invoice_row(uri: str, data: Optional[str], instruction: str) -> dict:
    row = answer(uri, "invoice", data or "")
    row.update(data=data, instruction=instruction)
    return row


def test_expected_answers_score_questions_exactly_and_json_field_by_field(tmp_path):
    references = {r.ref.item_id: r for r in [
        ReferenceItem(ref=ItemRef.make("/data/a.png"), answers={"answer": "Four cats.", "invoice": {"number": "A-7", "total": 12.5}}),
        ReferenceItem(ref=ItemRef.make("/data/b.png"), answers={"answer": "two", "invoice": {"number": "B-1", "total": 3}}),
    ]}
    question = answer("/data/a.png", "answer", " four  CATS. ")
    question["instruction"] = "How many cats? Answer briefly."
    rows = [question, answer("/data/b.png", "answer", "three"),
            invoice_row("/data/a.png", '{"number": "a-7", "total": 12.50, "extra": 1}', "Extract."),
            invoice_row("/data/b.png", '{"number": "B-1", "total": 4}', "Extract.")]
    scores = score_run(load_run(write_run(tmp_path / "run", rows)), references)
    by_key = {i.key: i for i in scores.answer_items}
    assert by_key["/data/a.png answer"].score == 1.0 and by_key["/data/a.png answer"].question == "How many cats? Answer briefly."
    assert by_key["/data/b.png answer"].score == 0.0
    assert by_key["/data/a.png invoice"].score == 1.0  # case, numeric spelling and extra fields do not matter
    assert by_key["/data/b.png invoice"].score == 0.5 and by_key["/data/b.png invoice"].expected == '{"number": "B-1", "total": 3}'
    report = evaluate.render_markdown([scores], "refs")
    assert "| Answer score ↑ | 0.6250 |" in report and "### Answers: lowest scores (run)" in report
    assert "| b.png | answer | 0.00 | – | two | three |" in report and "How many cats? Answer briefly." in report


def test_newest_row_wins_for_a_repeated_answer(tmp_path):
    rows = [answer("/data/a.png", "ocr", "wrong"), answer("/data/a.png", "ocr", "the quick brown fox jumps")]
    run = load_run(write_run(tmp_path / "run", rows))
    assert run.duplicate_rows == 1 and run.rows[("/data/a.png", "ocr")]["text"] == "the quick brown fox jumps"


def test_references_from_other_paths_need_match_by_name(tmp_path):
    run = write_run(tmp_path / "run", [answer("gs://bucket/evalset/a.png", "ocr", "the quick brown fox jumps")])
    with pytest.raises(ValueError, match="--match name"):
        score(run)
    assert score(run, match="name").ocr_items[0].errors.cer == 0.0


def test_match_by_name_refuses_ambiguous_names(tmp_path):
    rows = [answer("gs://b/x/a.png", "ocr", "one"), answer("gs://b/y/a.png", "ocr", "two")]
    with pytest.raises(ValueError, match="share the key"):
        load_run(write_run(tmp_path / "run", rows), match="name")


def test_two_runs_side_by_side(tmp_path, capsys):
    refs = tmp_path / "refs.parquet"
    write_references(str(refs), REFERENCES)
    good = write_run(tmp_path / "v1", [answer("/data/a.png", "ocr", "the quick brown fox jumps"),
                                       answer("/data/b.pdf", "ocr", "second page text", page=0)])
    # v2 drops "brown " on item a: 6 of the 41 reference characters -> CER +6/41.
    worse = write_run(tmp_path / "v2", [answer("/data/a.png", "ocr", "the quick fox jumps"),
                                        answer("/data/b.pdf", "ocr", "second page text", page=0)])
    evaluate.main(["--results", good, "--results", worse, "--label", "prompt-v1", "--references", str(refs),
                   "--report", str(tmp_path / "eval.md"), "--json", str(tmp_path / "eval.json")])
    printed = capsys.readouterr().out
    assert "| metric | prompt-v1 | v2 | Δ v2 − prompt-v1 |" in printed
    assert f"| OCR CER ↓ | 0.0000 | {6 / 41:.4f} | {6 / 41:+.4f} |" in printed
    report = (tmp_path / "eval.md").read_text()
    assert "### OCR CER per item: v2 vs prompt-v1 (regressions first)" in report
    assert f"| a.png | 0.0000 | {6 / 25:.4f} | {6 / 25:+.4f} |" in report
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert [run["label"] for run in scores["runs"]] == ["prompt-v1", "v2"]
    assert scores["runs"][1]["overall"]["OCR CER"] == pytest.approx(6 / 41)
    assert {i["item_id"]: i["cer"] for i in scores["runs"][1]["ocr_items"]}["/data/a.png"] == pytest.approx(6 / 25)


def test_command_line_errors_name_the_problem(tmp_path, capsys):
    refs = tmp_path / "refs.jsonl"
    write_references(str(refs), REFERENCES)
    run = write_run(tmp_path / "a" / "run", [answer("/data/a.png", "ocr", "x")])
    same_name = write_run(tmp_path / "b" / "run", [answer("/data/a.png", "ocr", "y")])
    assert evaluate.main(["--results", run, "--results", same_name, "--references", str(refs)]) == 2
    assert "--label" in capsys.readouterr().err
    assert evaluate.main(["--results", str(tmp_path / "nowhere"), "--references", str(refs)]) == 2
    assert "no results Parquet files" in capsys.readouterr().err


def test_ocr_is_scored_per_text_source(tmp_path):
    """--text_layer: the pages a PDF's text layer answered and those the model read get their own OCR figures."""
    from_layer = answer("/data/b.pdf", "ocr", "second page text", page=0)
    from_layer.update(text_source="text_layer", text_layer_verdict="trusted")
    run = write_run(tmp_path / "run", [answer("/data/a.png", "ocr", "the quick brown fox"), from_layer])
    scores = score(run)
    assert {item.item_id: item.text_source for item in scores.ocr_items} == {"/data/a.png": "model", "/data/b.pdf#page=0": "text_layer"}
    assert scores.ocr_by_source["text_layer"].cer == 0 and scores.ocr_by_source["model"].cer == pytest.approx(6 / 25)
    assert scores.ocr.cer == pytest.approx(6 / 41)  # the overall figure still covers both
