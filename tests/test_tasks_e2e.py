"""Your own tasks end to end on the real engine: JSON against a schema, a question per item, markdown, layout, image budgets."""
from __future__ import annotations

import json
import pathlib

import duckdb
import jsonschema
import pyarrow.parquet as pq
import pytest
import yaml

from library.metadata import ItemValues
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA
from tasks.builtin import BUILTIN_TASKS
from tasks.kinds.layout import CATEGORIES
from tests.conftest import copy_samples, run_pipeline
from tests.shard_data import image_bytes, parquet_bytes, tar_bytes
from tests.test_pipeline_e2e import fresh_images, prefix_lengths

pytestmark = pytest.mark.engine  # every test here starts the vLLM engine (the fast tier skips them)

# Tight enough that the constrained answer ends inside max_tokens whatever the weights: at most 31 tokens even
# one character a token ({"number":" 11, six ASCII characters, ","total": 10, three digits, }). A maxLength
# alone would admit \uXXXX escapes and multi-byte characters (up to 36 tokens for the six).
INVOICE_SCHEMA = {
    "type": "object",
    "properties": {"number": {"type": "string", "pattern": "^[A-Za-z0-9-]{1,6}$"},
                   "total": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["number", "total"],
    "additionalProperties": False,
}
TASKS = {
    "tasks": [
        {"name": "invoice", "instruction": "Extract the invoice number and total.", "output": "json",
         "schema": INVOICE_SCHEMA, "max_tokens": 48},
        {"name": "answer", "instruction": "Answer briefly: {question}", "max_tokens": 8},
    ]
}


ITEMS = 7  # the question run's: 3 tar samples, 2 Parquet rows, 2 manifest files


def read(out: pathlib.Path, table: str) -> list[dict]:
    return pq.read_table(out / table, schema=RESULTS_SCHEMA if table == "results" else ERRORS_SCHEMA).to_pylist()


@pytest.fixture(scope="module")
def question_run(tmp_path_factory, private_model_cache):
    """Questions from tar sidecars, a manifest column and a Parquet pass-through column; one item of each without one."""
    root = tmp_path_factory.mktemp("questions")
    (root / "tasks.yaml").write_text(yaml.safe_dump(TASKS))
    (root / "shard.tar").write_bytes(tar_bytes([
        ("s/000001.png", image_bytes((200, 10, 10))),
        ("s/000001.json", json.dumps({"question": "What colour is it?", "source": "cam"}).encode()),
        ("s/000002.png", image_bytes((10, 200, 10))),
        ("s/000002.json", json.dumps({"question": "Is it square?"}).encode()),
        ("s/000003.png", image_bytes((10, 10, 200))),  # no sidecar: no question
    ]))
    (root / "a.png").write_bytes(image_bytes((90, 90, 90)))
    (root / "b.png").write_bytes(image_bytes((30, 60, 90)))
    (root / "manifest.csv").write_text("uri,question,batch\na.png,What is shown?,7\nb.png,,7\n")  # b: an empty cell
    (root / "rows.parquet").write_bytes(parquet_bytes({
        "id": ["p-1", "p-2"], "image": [image_bytes((250, 250, 0)), image_bytes((0, 250, 250))],
        "question": ["Which colour?", None],  # p-2: a null
    }))
    out = root / "out"
    summary = run_pipeline("--input", str(root / "shard.tar"), "--input", str(root / "rows.parquet"),
                           "--parquet_passthrough_columns", "question", "--manifest", str(root / "manifest.csv"),
                           "--output", str(out), "--task_file", str(root / "tasks.yaml"))
    return summary, out, root


def test_every_json_answer_validates_against_the_tasks_schema(question_run):
    summary, out, _ = question_run
    invoices = [row for row in read(out, "results") if row["task"] == "invoice"]
    assert len(invoices) == ITEMS  # constrained by the schema (cpu-tiny has structured output), every answer parses
    for row in invoices:
        jsonschema.validate(json.loads(row["data"]), INVOICE_SCHEMA)
        assert row["detections"] is None and row["instruction"] == "Extract the invoice number and total."
        # vLLM's per-token texts spell the answer, so each field has its own confidence.
        assert sorted(field["field"] for field in row["field_confidence"]) == ["number", "total"], row
        assert all(0 <= field["confidence"] <= 1 for field in row["field_confidence"])
    assert all(row["data"] is None and row["field_confidence"] is None for row in read(out, "results") if row["task"] != "invoice")
    assert summary["config"]["task_definitions"]["invoice"] == {
        "output": "json", "instruction": "Extract the invoice number and total.", "schema": INVOICE_SCHEMA,
    }


def test_the_data_column_is_queryable_with_duckdbs_json_functions(question_run):
    _, out, _ = question_run
    rows = duckdb.sql(
        f"SELECT item_id, json_extract_string(data, '$.number') AS number, CAST(json_extract(data, '$.total') AS INTEGER) AS total "
        f"FROM read_parquet('{out}/results/*.parquet') WHERE task = 'invoice' AND json_valid(data)"
    ).fetchall()
    assert len(rows) == ITEMS and all(0 <= total <= 999 and len(number) <= 6 for _, number, total in rows)


def test_questions_come_from_sidecars_manifest_and_parquet_columns_and_a_missing_one_fails_that_task_only(question_run):
    summary, out, root = question_run
    asked = {row["item_id"]: row["instruction"] for row in read(out, "results") if row["task"] == "answer"}
    assert asked == {
        f"{root}/shard.tar#member=s/000001": "Answer briefly: What colour is it?",
        f"{root}/shard.tar#member=s/000002": "Answer briefly: Is it square?",
        f"{root}/a.png": "Answer briefly: What is shown?",
        f"{root}/rows.parquet#member=p-1": "Answer briefly: Which colour?",
    }
    errors = read(out, "errors")
    assert sorted((e["item_id"], e["task"], e["stage"], e["error_type"]) for e in errors) == [
        (f"{root}/b.png", "answer", "prompt", "MissingValue"),
        (f"{root}/rows.parquet#member=p-2", "answer", "prompt", "MissingValue"),
        (f"{root}/shard.tar#member=s/000003", "answer", "prompt", "MissingValue"),
    ]
    assert all("{question}" in e["message"] and e["task_fingerprint"] for e in errors)
    # Nothing else about those items is affected; the manifest row's columns travel with the item.
    by_item = {(row["item_id"], row["task"]) for row in read(out, "results")}
    assert (f"{root}/b.png", "invoice") in by_item and (f"{root}/shard.tar#member=s/000003", "invoice") in by_item
    metadata = {row["item_id"]: json.loads(row["metadata"] or "{}") for row in read(out, "results")}
    assert metadata[f"{root}/a.png"] == {"question": "What is shown?", "batch": "7"} and metadata[f"{root}/b.png"] == {"batch": "7"}
    counts = summary["counts"]
    assert counts["error_rows_by_stage"] == {"prompt": 3} and summary["accounting"]["balanced"]
    assert counts["result_rows"] + counts["error_rows"] == ITEMS * 2 == counts["tasks_submitted"]


def test_invalid_json_climbs_the_retry_ladder_then_becomes_a_parse_error(tmp_path):
    inputs = tmp_path / "in"
    copy_samples(inputs)
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(TASKS))
    # Without schema-constrained decoding (as on TPU) the random model's answer is never valid JSON.
    summary = run_pipeline("--input", f"{inputs}/receipt.png", "--input", f"{inputs}/chart.webp", "--output", str(tmp_path / "out"),
                           "--task_file", str(tmp_path / "tasks.yaml"), "--tasks", "invoice", "--structured_output", "off")
    errors = read(tmp_path / "out", "errors")
    assert [(e["task"], e["stage"], e["attempts"]) for e in errors] == [("invoice", "parse", 3)] * 2
    for error in errors:
        # CutOffAnswer where the random model ran to max_tokens (which depends on the CPU), else the parse's own.
        assert error["error_type"] in ("SchemaMismatch", "NoJSONDocument", "CutOffAnswer")
        assert "after 3 attempts" in error["message"]
        assert error["raw_output"] is not None and "JSON Schema" in error["instruction"]  # the last rung restates the schema
    assert summary["counts"]["retries"] == 2 * 2 and summary["accounting"]["balanced"]


def test_markdown_end_to_end(tmp_path):
    inputs = tmp_path / "in"
    copy_samples(inputs)
    summary = run_pipeline("--input", f"{inputs}/report.pdf", "--output", str(tmp_path / "out"), "--tasks", "markdown",
                           "--max_tokens", "markdown=24")
    rows = read(tmp_path / "out", "results")
    assert sorted(row["page"] for row in rows) == [0, 1, 2] and {row["task"] for row in rows} == {"markdown"}
    instruction = BUILTIN_TASKS["markdown"].request(ItemValues(None)).instruction
    for row in rows:
        # 24 tokens, twice that on the text ladder's last rung (the random model's answers run to the limit).
        assert row["instruction"] == instruction and row["data"] is None
        assert row["generated_tokens"] <= 24 * (2 if row["attempts"] == 3 else 1)
        assert "<|channel>" not in (row["text"] or "") and "<turn|>" not in (row["text"] or "")
    assert summary["config"]["task_definitions"]["markdown"]["output"] == "text" and summary["accounting"]["balanced"]


def test_layout_end_to_end(tmp_path):
    """Every sample item ends as a layout row (blocks inside the image, known categories) or a parse error row.

    The random weights' answers are garbage, constrained or not: structure only, never what the blocks say.
    """
    inputs = tmp_path / "in"
    copy_samples(inputs)
    summary = run_pipeline("--input", str(inputs), "--output", str(tmp_path / "out"), "--tasks", "layout",
                           "--max_tokens", "layout=64")
    rows, errors = read(tmp_path / "out", "results"), read(tmp_path / "out", "errors")
    for written in (tmp_path / "out" / "results").glob("*.parquet"):
        assert pq.read_schema(written).field("blocks").type == RESULTS_SCHEMA.field("blocks").type
    assert len({row["item_id"] for row in rows} | {error["item_id"] for error in errors}) == len(rows) + len(errors) == 8
    assert {error["stage"] for error in errors} <= {"parse"} and summary["accounting"]["balanced"]
    for row in rows:
        assert row["task"] == "layout" and row["blocks"] is not None and row["detections"] is None
        for block in row["blocks"]:
            assert block["category"] in CATEGORIES
            if block["box_px"] is not None:
                px = block["box_px"]
                assert 0 <= px["xmin"] < px["xmax"] <= row["width"] and 0 <= px["ymin"] < px["ymax"] <= row["height"]
    assert summary["config"]["task_definitions"]["layout"]["output"] == "layout"


def test_two_image_budgets_on_one_image_form_two_prefix_groups(tmp_path, tiny_checkpoint):
    """Same-budget tasks share the image's prefix; the other budget's tasks compute their own."""
    look, colour = "What is in the picture?", "Name its main colour."
    # No retry ladder: the random model's answers all run to max_tokens, and a retried row keeps its retry's counts.
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump({"tasks": [
        {"name": "look_small", "instruction": look, "max_tokens": 4, "retries": []},
        {"name": "look_large", "instruction": look, "max_tokens": 4, "vision_tokens": 140, "retries": []},
        {"name": "colour_small", "instruction": colour, "max_tokens": 4, "retries": []},
        {"name": "colour_large", "instruction": colour, "max_tokens": 4, "retries": []},
    ]}))
    fresh_images(tmp_path / "in", 2)
    summary = run_pipeline("--input", f"{tmp_path}/in/*", "--output", str(tmp_path / "out"), "--task_file", str(tmp_path / "tasks.yaml"),
                           "--tasks", "colour_small,look_small,colour_large,look_large", "--task_vision_tokens", "colour_large=140")
    budgets = summary["config"]["task_vision_tokens"]
    # No job budget: the tasks without one get the tiny checkpoint's own (70), stated on every request.
    assert budgets == {"colour_small": 70, "look_small": 70, "colour_large": 140, "look_large": 140}
    groups = {70: [colour, look], 140: [colour, look]}
    block = 64  # this model's layout shares KV in 64-token units (test_pipeline_e2e)
    rows = read(tmp_path / "out", "results")
    for item_id in {row["item_id"] for row in rows}:
        mine = {row["task"]: row for row in rows if row["item_id"] == item_id}
        # The same question costs the larger budget's extra image tokens.
        assert mine["look_large"]["prompt_tokens"] > mine["look_small"]["prompt_tokens"]
        for budget, texts in groups.items():
            before_image, through_image = prefix_lengths(tiny_checkpoint, texts, budget)
            first, second = sorted(mine[task]["cached_tokens"] for task in mine if budgets[task] == budget)
            # The first of each group reuses only the system prompt: not the other budget's image blocks.
            assert first <= before_image, (item_id, budget, first, before_image)
            assert through_image - block < second <= through_image, (item_id, budget, second, through_image)
    assert summary["accounting"]["balanced"] and len(rows) == 2 * 4


def test_a_changed_task_definition_reruns_exactly_that_task_and_an_unchanged_rerun_writes_nothing(tmp_path):
    from pipelines import vision_batch

    inputs = tmp_path / "in"
    copy_samples(inputs)
    base = ["--input", f"{inputs}/receipt.png", "--input", f"{inputs}/chart.webp", "--tasks", "ocr,caption",
            "--max_tokens", "caption=8"]

    def run(name: str, *args: str) -> dict:
        return vision_batch.run([*base, "--output", str(tmp_path / name), *args])

    run("first", "--max_tokens", "ocr=8")
    first = {(row["item_id"], row["task"]): row["task_fingerprint"] for row in read(tmp_path / "first", "results")}
    unchanged = run("again", "--max_tokens", "ocr=8", "--incremental_from", str(tmp_path / "first"))
    assert unchanged["counts"]["result_rows"] == unchanged["counts"]["error_rows"] == 0
    assert unchanged["counts"]["skipped_tasks"] == 4 and unchanged["accounting"]["balanced"]
    raised = run("raised", "--max_tokens", "ocr=12", "--incremental_from", str(tmp_path / "first"))
    rerun = read(tmp_path / "raised", "results")
    assert sorted(row["task"] for row in rerun) == ["ocr", "ocr"]  # OCR only: the captions' definition did not change
    assert all(row["task_fingerprint"] != first[(row["item_id"], "ocr")] for row in rerun)
    assert raised["counts"]["skipped_tasks"] == 2 and raised["accounting"]["balanced"]
