"""Incremental runs: the hash pass, the filter of current items, and reruns on the real engine.

The pipeline tests run the job several times over the bundled samples (8
items) on the tiny model and check exactly which (item, task) pairs each run
answers, skips and decodes.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.api import EngineSettings
from library import formats
from library.formats import DecodeLimits
from library.shards import ShardSettings
from schemas.records import DecodeUnit, ImageItem, RunInfo, SourceFile
from schemas.tables import RESULTS_SCHEMA
from tasks.builtin import BUILTIN_TASKS
from tests.conftest import SAMPLES, copy_samples, run_pipeline
from tests.shard_data import image_bytes, tar_bytes, write_parquet_shard, write_tar
from tests.test_decode import pdf_bytes
from tests.test_pipeline_e2e import truncated_png
from transforms import incremental
from transforms.decode import DecodeUnits, PlanUnits
from transforms.incremental import BuildHashFilter, HashFilter, HashUnits, answered_tasks, answer_key, hash_words, words_of
from transforms.sinks import SUMMARY_FILE

RUN = RunInfo(run_id="r", model_id="model-a", prompt_version="v2")


def digests(prefix: str, count: int) -> list[str]:
    return [hashlib.sha256(f"{prefix}{i}".encode()).hexdigest() for i in range(count)]


def built_filter(hashes: list[str], false_positive_rate: float = 0.001, min_bits: int = 1024) -> HashFilter:
    """Through the CombineFn as Beam uses it: partial accumulators on two workers, merged once."""
    fn = BuildHashFilter(false_positive_rate, min_bits)
    halves = []
    for part in (hashes[::2], hashes[1::2]):
        accumulator = fn.create_accumulator()
        for content_hash in part:
            accumulator = fn.add_input(accumulator, content_hash)
        halves.append(accumulator)
    return fn.extract_output(fn.merge_accumulators(halves))


# ---------------------------------------------------------------- filter and keys (no engine)


def test_filter_never_rules_out_a_current_hash():
    current = digests("current-", 5000)
    assert built_filter(current).may_contain(pa.array(current)).all()


def test_filter_false_positive_rate_is_near_its_target():
    current = digests("current-", 20_000)
    others = pa.array(digests("history-", 200_000))
    rate = built_filter(current).may_contain(others).mean()
    # Target 0.1 %: the expected count is 200; a Bloom filter sized by the standard formula lands near it.
    assert 0.0002 < rate < 0.002


def test_a_filter_at_its_minimum_size_is_as_selective_as_its_bits_allow():
    # 12 items in 1,024 bits with 10 probes: a random hash passes with p ~ 3e-10. Probes that
    # are not independent (plain double hashing, h1 + i*h2 mod 1024) let ~6 in 100,000 through.
    assert not built_filter(digests("current-", 12)).may_contain(pa.array(digests("history-", 200_000))).any()


def test_filter_rules_out_what_cannot_be_a_hash():
    current = digests("current-", 10)
    hashes = pa.array([current[0], None, "", "abc", current[1] + "0", current[2]])
    assert built_filter(current).may_contain(hashes).tolist() == [True, False, False, False, False, True]


def test_vectorised_hash_words_match_the_current_side_on_sliced_and_chunked_columns():
    hashes = digests("x", 50)
    expected = np.frombuffer(b"".join(words_of(h) for h in hashes), dtype=">u8").astype(np.uint64)
    # A slice has a non-zero offset into its buffers; a chunked column with nulls takes the filter path.
    shaped, words = hash_words(pa.array(["pad"] + hashes)[1:])
    assert shaped.all() and (words == expected).all()
    chunked = pa.chunked_array([pa.array(hashes[:20] + [None]), pa.array(hashes[20:])])
    shaped, words = hash_words(chunked)
    assert shaped.tolist() == [True] * 20 + [False] + [True] * 30
    assert (words[shaped] == expected).all()


def test_empty_input_gives_a_filter_that_rules_everything_out():
    empty = built_filter([])
    assert empty.num_bits == 1024 and not empty.may_contain(pa.array(digests("h", 1000))).any()


def test_answered_tasks_need_the_whole_key():
    content = digests("item", 1)[0]
    fingerprints = {"ocr": "f-ocr", "caption": "f-caption", "detect": "f-detect", "answer": "f-answer"}
    earlier = [
        answer_key(content, "ocr", "model-a", "v2", "f-ocr"),
        answer_key(content, "caption", "model-b", "v2", "f-caption"),  # another model
        answer_key(content, "detect", "model-a", "v1", "f-detect"),  # another prompt version
        answer_key(digests("other", 1)[0], "caption", "model-a", "v2", "f-caption"),  # another item
        answer_key(content, "answer", "model-a", "v2", "f-other-question"),  # another definition or question
    ]
    assert answered_tasks(content, fingerprints, earlier, RUN) == ("ocr",)


def test_hash_pass_gives_decode_hashes_without_decoding(tmp_path, monkeypatch):
    """Every format the decoder reads: per unit, the hash pass yields exactly the hashes DecodeUnits gives its items."""
    for name in ("receipt.png", "report.pdf", "fax.tiff"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    write_tar(tmp_path / "shard.tar")
    write_parquet_shard(tmp_path / "shard.parquet")
    # The PNG first: with a PDF as first member, formats.sniff takes the whole tar for a PDF (a sniffing bug).
    (tmp_path / "pdf_member.tar").write_bytes(tar_bytes([("doc/1.png", image_bytes((1, 2, 3))), ("doc/2.pdf", pdf_bytes(3))]))
    (tmp_path / "truncated.png").write_bytes(truncated_png())  # hashed; its decode fails later, with that hash
    limits, shards = DecodeLimits(pages_per_unit=2), ShardSettings()
    units = [
        unit
        for path in sorted(tmp_path.iterdir())
        for unit in PlanUnits(limits, shards).process(SourceFile(str(path), path.stat().st_size))
        if isinstance(unit, DecodeUnit)
    ]
    expected = {}
    for unit in units:
        outputs = list(DecodeUnits(limits, shards).process(unit))
        expected[incremental.unit_key(unit)] = sorted(
            out.info.content_hash if isinstance(out, ImageItem) else out.value.content_hash for out in outputs
            if isinstance(out, ImageItem) or out.value.content_hash
        )
    # receipt, report's 3 pages, fax's 2 frames, 3 tar images, 2 Parquet images, the member PDF's 3 pages + PNG, truncated
    assert sum(map(len, expected.values())) == 1 + 3 + 2 + 3 + 2 + 3 + 1 + 1

    calls = []
    for function in ("decode_image_frame", "render_pdf_page"):
        monkeypatch.setattr(formats, function, lambda *args, _name=function: calls.append(_name))
    tasks = [BUILTIN_TASKS[name] for name in TASKS]
    settings = EngineSettings(model_path="/m", engine_args={}, max_in_flight=1, structured_output=True)
    hashed = {}
    for unit in units:
        for content_hash, item in HashUnits(limits, shards, tasks, settings).process(unit):
            hashed.setdefault(item.unit_key, []).append(content_hash)
            assert set(item.fingerprints) == set(TASKS) and item.unit_key == incremental.unit_key(unit)
    assert calls == []
    assert {key: sorted(hashes) for key, hashes in hashed.items()} == {key: h for key, h in expected.items() if h}


# ---------------------------------------------------------------- reruns on the real engine


def write_history(path: pathlib.Path, rows: list[dict]) -> str:
    """A complete run's results table as the sink writes it (the schema, zstd), at PATH/results/part-0.parquet.

    A run_summary.json beside it marks the run complete: only complete runs count as history.
    """
    (path / "results").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA), path / "results" / "part-0.parquet", compression="zstd")
    (path / SUMMARY_FILE).write_text(json.dumps({"state": "SUCCEEDED"}))
    return str(path)


def read_pairs(output: pathlib.Path) -> set[tuple[str, str]]:
    if not any((output / "results").glob("*.parquet")):
        return set()
    rows = pq.read_table(output / "results", schema=RESULTS_SCHEMA, columns=["item_id", "task"]).to_pylist()
    pairs = [(row["item_id"].rsplit("/", 1)[-1], row["task"]) for row in rows]
    assert len(pairs) == len(set(pairs))
    return set(pairs)


ALL_ITEMS = {"chart.webp", "fax.tiff#page=0", "fax.tiff#page=1", "receipt.png", "report.pdf#page=0", "report.pdf#page=1",
             "report.pdf#page=2", "shapes_rotated.jpg"}
TASKS = ("ocr", "caption", "detect")


class DecodeCounter:
    """Counts real pixel decodes and renders made by the pipeline (the functions still run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[str] = []
        for name in ("decode_image_frame", "render_pdf_page"):
            original = getattr(formats, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(formats, name, counted)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, private_model_cache):
    """A: ocr of everything; B: caption + detect of receipt and report. Inputs include a PNG whose decode fails."""
    root = tmp_path_factory.mktemp("incremental")
    copy_samples(root / "inputs")
    (root / "inputs" / "truncated.png").write_bytes(truncated_png())
    inputs = f"{root}/inputs/*"
    a = run_pipeline("--input", inputs, "--output", f"{root}/a", "--tasks", "ocr")
    b = run_pipeline("--input", f"{root}/inputs/receipt.png", "--input", f"{root}/inputs/report.pdf",
                     "--output", f"{root}/b", "--tasks", "caption,detect")
    assert a["counts"]["result_rows"] == 8 and b["counts"]["result_rows"] == 8
    return root, inputs


@pytest.fixture(scope="module")
def partial_run(runs):
    """C: all tasks, incremental from A and B; pixel decodes counted."""
    root, inputs = runs
    with pytest.MonkeyPatch.context() as monkeypatch:
        counter = DecodeCounter(monkeypatch)
        summary = run_pipeline("--input", inputs, "--output", f"{root}/c", "--incremental_from", f"{root}/a,{root}/b")
    return summary, root / "c", counter.calls


@pytest.mark.engine
def test_incremental_run_answers_exactly_the_missing_tasks(partial_run):
    summary, output, _ = partial_run
    done = {"receipt.png", "report.pdf#page=0", "report.pdf#page=1", "report.pdf#page=2"}
    assert read_pairs(output) == {(item, task) for item in ALL_ITEMS - done for task in ("caption", "detect")}
    counts = summary["counts"]
    assert counts["items"] == 8 and counts["skipped_items"] == 4
    assert counts["skipped_tasks"] == 4 * 3 + 4 * 1 and counts["tasks_submitted"] == 8
    assert counts["history_rows"] == 16 and counts["history_candidates"] == 16
    # The PNG that cannot be decoded is never an answer: it fails again, and is counted.
    assert counts["error_rows_by_stage"] == {"decode": 1}
    assert summary["accounting"]["items_in"] == 9 and summary["accounting"]["balanced"]


@pytest.mark.engine
def test_fully_answered_items_are_not_decoded(partial_run):
    _, _, calls = partial_run
    # chart, two fax frames, shapes and the truncated PNG are decoded; receipt and the report's pages are not.
    assert sorted(calls) == ["decode_image_frame"] * 5


@pytest.mark.engine
def test_rerun_of_a_finished_input_skips_everything(runs, partial_run, monkeypatch):
    root, inputs = runs
    counter = DecodeCounter(monkeypatch)
    summary = run_pipeline("--input", inputs, "--output", f"{root}/d", "--incremental_from", f"{root}/*")
    assert read_pairs(root / "d") == set()
    counts = summary["counts"]
    assert (counts["skipped_items"], counts["skipped_tasks"], counts["tasks_submitted"]) == (8, 24, 0)
    assert counter.calls == ["decode_image_frame"]  # only the PNG that never decodes
    assert summary["accounting"]["balanced"]


@pytest.mark.engine
def test_filter_false_positives_never_skip_and_other_models_are_not_used(runs, partial_run, tmp_path, monkeypatch):
    """A saturated filter lets most unrelated history through; the exact join still skips only real answers."""
    root, inputs = runs
    new_image = tmp_path / "new" / "new.png"
    new_image.parent.mkdir()
    new_image.write_bytes(image_bytes((90, 30, 160), size=(120, 80)))
    new_hash = hashlib.sha256(new_image.read_bytes()).hexdigest()
    template = pq.read_table(root / "a" / "results", schema=RESULTS_SCHEMA).to_pylist()[0]
    model_id = template["model_id"]
    rows = [dict(template, content_hash=h, item_id=f"gs://elsewhere/{i}.png") for i, h in enumerate(digests("unrelated-", 3000))]
    # The new image's own history, from another model and from another prompt version: not answers for this run.
    rows += [dict(template, content_hash=new_hash, task=task, model_id="another-model") for task in TASKS]
    rows += [dict(template, content_hash=new_hash, task=task, prompt_version="v-old") for task in TASKS]
    history = write_history(tmp_path / "history", rows)

    monkeypatch.setattr(incremental, "FALSE_POSITIVE_RATE", 0.9)  # one probe ...
    monkeypatch.setattr(incremental, "MIN_FILTER_BITS", 8)  # ... into 8 bits for 10 items
    summary = run_pipeline("--input", inputs, "--input", str(new_image), "--output", str(tmp_path / "e"),
                           "--incremental_from", f"{root}/a,{root}/b,{root}/c,{history}")
    assert read_pairs(tmp_path / "e") == {("new.png", task) for task in TASKS}
    counts = summary["counts"]
    assert (counts["skipped_items"], counts["skipped_tasks"]) == (8, 24)
    # Many unrelated rows of this model got through the saturated filter to the exact join ...
    assert counts["history_candidates"] > 24 + 1000
    # ... while the other model's and prompt version's rows were dropped before it.
    assert counts["history_rows"] == 24 + 3000 + 6
    assert model_id == summary["model"]["id"]
