"""Both Parquet schemas round-trip the rows the pipeline builds."""
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.records import Detection, ErrorRecord, ItemInfo, ItemRef, ParsedAnswer, RunInfo, Stage, TaskCompletion
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA, error_row, result_row

RUN = RunInfo(run_id="r1", model_id="m", prompt_version="v1")
INFO = ItemInfo(ref=ItemRef.make("gs://b/doc.pdf", page=2), width=800, height=600, content_hash="abc")


def completion(task, text="hello", finish="stop"):
    return TaskCompletion(INFO, task, text, finish, prompt_tokens=120, generated_tokens=5, cached_tokens=96, latency_s=0.25)


def test_item_ids_are_stable_and_readable():
    assert ItemRef.make("gs://b/doc.pdf", page=2).item_id == "gs://b/doc.pdf#page=2"
    assert ItemRef.make("gs://b/s.tar", member="000/k").item_id == "gs://b/s.tar#member=000/k"
    assert ItemRef.make("/x/a.png").item_id == "/x/a.png"


def test_results_round_trip(tmp_path):
    box = Detection("cat", (100, 200, 300, 400), (0.1, 0.2, 0.3, 0.4), (60, 160, 180, 320))
    rows = [
        result_row(completion("ocr"), RUN, ParsedAnswer("hello")),
        result_row(completion("detect", "[...]", "length"), RUN, ParsedAnswer("[...]", (box,))),
        result_row(completion("detect", "[]"), RUN, ParsedAnswer("[]", ())),
        result_row(completion("invoice", '{"n": "7"}'), RUN, ParsedAnswer('{"n": "7"}', data='{"n":"7"}')),
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA), tmp_path / "r.parquet")
    back = pq.read_table(tmp_path / "r.parquet")
    assert back.schema.equals(RESULTS_SCHEMA)
    got = back.to_pylist()
    assert got[0]["detections"] is None and got[0]["page"] == 2 and got[0]["latency_ms"] == 250.0
    assert got[1]["truncated"] is True and got[0]["truncated"] is False
    [d] = got[1]["detections"]
    assert d["label"] == "cat"
    assert d["box_1000"] == {"ymin": 100, "xmin": 200, "ymax": 300, "xmax": 400}
    assert d["box_px"] == {"ymin": 60, "xmin": 160, "ymax": 180, "xmax": 320}
    assert abs(d["box"]["ymax"] - 0.3) < 1e-6
    assert got[2]["detections"] == []
    assert got[0]["data"] is None and got[3]["data"] == '{"n":"7"}' and got[3]["detections"] is None
    assert got[0]["created_at"].tzinfo is not None


def test_errors_round_trip(tmp_path):
    error = ErrorRecord.from_exception(ItemRef.make("/x/bad.png"), Stage.DECODE, OSError("truncated file"))
    rows = [error_row(error, RUN)]
    pq.write_table(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA), tmp_path / "e.parquet")
    [got] = pq.read_table(tmp_path / "e.parquet").to_pylist()
    assert (got["stage"], got["error_type"], got["message"]) == ("decode", "OSError", "truncated file")
    assert got["task"] is None and got["page"] is None
