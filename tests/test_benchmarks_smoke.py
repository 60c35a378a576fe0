"""The benchmark's metric helpers, as pure functions (no engine, no timing: benchmarks are never tests)."""
from __future__ import annotations

from benchmarks.measure import TaskRecord, prefix_reuse, ratio
from benchmarks.server import chat_messages, server_flags
from library.metadata import ItemValues
from tasks.builtin import BUILTIN_TASKS

SUFFIX = {"ocr": 10, "caption": 4, "detect": 12}  # prompt tokens after the shared system + image prefix


def image(name: str, shared: int, cached: dict[str, int]) -> list[TaskRecord]:
    return [TaskRecord(name, task, shared + SUFFIX[task], 5, hit) for task, hit in cached.items()]


def test_prefix_reuse_counts_later_tasks_against_the_shared_prefix():
    # Image 1: 100 shared tokens, first task hit only the 32-token system block, the others 96.
    # Image 2: 70 shared tokens (fewer image tokens), the others hit 64.
    records = image("1", 100, {"ocr": 32, "caption": 96, "detect": 96}) + image("2", 70, {"ocr": 32, "caption": 64, "detect": 64})
    reuse = prefix_reuse(records, SUFFIX)
    assert reuse.reused_tokens == 96 * 2 + 64 * 2
    assert reuse.shareable_tokens == 2 * 100 + 2 * 70
    assert reuse.block_tokens == 32
    assert reuse.block_aligned_shareable == 2 * 96 + 2 * 64
    assert reuse.ratio_of_block_aligned == 1.0
    assert abs(reuse.ratio - 320 / 340) < 1e-9


def test_prefix_reuse_without_cache_hits():
    reuse = prefix_reuse(image("1", 100, {"ocr": 0, "caption": 0, "detect": 0}), SUFFIX)
    assert (reuse.reused_tokens, reuse.block_tokens, reuse.ratio) == (0, 0, 0.0)


def test_ratio_is_none_when_a_side_is_missing():
    assert ratio(2.0, 4.0) == 0.5
    assert ratio(None, 4.0) is None and ratio(2.0, None) is None and ratio(2.0, 0) is None


def test_server_flags_mirror_engine_args():
    flags = server_flags({"enforce_eager": True, "enable_prefix_caching": False, "block_size": 32,
                          "limit_mm_per_prompt": {"image": 1}})
    assert flags == ["--enforce-eager", "--no-enable-prefix-caching", "--block-size", "32",
                     "--limit-mm-per-prompt", '{"image": 1}']


def test_server_messages_are_the_pipeline_messages_with_an_image_url():
    caption = BUILTIN_TASKS["caption"].request(ItemValues(None)).instruction
    messages = chat_messages(caption, "data:image/png;base64,AAAA")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"][0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert messages[1]["content"][1]["text"] == caption


def test_report_has_every_variant_ratio_and_the_step_cost_table(tmp_path):
    import datetime

    from benchmarks import report
    from benchmarks.measure import VariantResult
    from benchmarks.run import VARIANTS
    from benchmarks.workload import Workload

    def result(key: str, wall_s: float) -> VariantResult:
        return VariantResult(key, 10, 30, wall_s, 3000, 600, 1500, 0.9 * wall_s, 2**30, notes={"engine_steps": 40})

    results = {"a": result("a", 10.0), "b": result("b", 12.5), "d1": result("d1", 25.0), "ha": result("ha", 2.0),
               "hb": result("hb", 2.5)}
    results["hb"].notes.update(front_cpu_s=1.0, child_cpu_s=0.0, requests_rendered=30, images_preprocessed=10)
    now = datetime.datetime(2026, 11, 22, tzinfo=datetime.timezone.utc)
    workloads = {"bench": Workload(tmp_path, "ckpt", "bench", "cpu-tiny", {"ocr": 8}),
                 "host": Workload(tmp_path, "tiny", "tiny-26b-a4b", "cpu-tiny", {"ocr": 8}, vision_tokens=280)}
    stage = {"images": "workload", "model": "tiny-12b-unified", "stage": "decode", "items_per_s": 250.0, "cpu_ms_per_item": 4.0, "cores_busy": 1.0}
    document = report.results_document(
        command="python -m benchmarks.run", started=now, finished=now, machine={"cores": 2, "cpu_model": "x", "ram_gib": 24},
        load_at_start=0.5, loads={}, workloads=workloads, parameters=10**8,
        variants=VARIANTS, results=results, step_cost=[{"sequences": 1, "ms_per_step": 20.0, "tokens_per_s": 50.0}],
        streaming={}, errors={}, suffix_tokens={"bench": SUFFIX, "host": SUFFIX},
        host_stages=[{**stage, "threads": 1}, {**stage, "threads": 2, "items_per_s": 480.0, "cores_busy": 1.9}],
        host_parameters=10**6,
    )
    assert document["ratios"]["b_over_a"] == 0.8 and document["ratios"]["b_over_d1"] == 2.0
    assert document["ratios"]["b_over_c"] is None  # (c) not run: no figure, not a zero
    assert document["ratios"]["hb_over_ha"] == 0.8 and document["ratios"]["hb2_over_hb"] is None
    assert document["targets"]["b_over_a"]["met"] is False and document["targets"]["b_over_c"]["met"] is None
    text = report.markdown(document)
    assert "(b)/(d1) = 2.000" in text
    assert "| 1 | 20.0 | 50.0 |" in text
    assert "| (d1) vllm serve as shipped" in text
    # Host-bound rows only in the host table, with CPU per item and shared preprocessing; the stages by threads.
    host_table = text[text.index("## The host feed"):]
    assert "| (hb) this pipeline, engine core in-process" in host_table and "| (b) " not in host_table
    assert "| 100 | 0.000 | - | 10 / 30 |" in host_table  # 1.0 s / 10 items; 10 images preprocessed for 30 requests
    assert "| workload | tiny-12b-unified | decode | 250.0 (1.0 cores) | 480.0 (1.9 cores) | 4.0 |" in host_table
    # Results stored before the host-bound regime existed still render (every benchmark command re-renders BENCHMARKS.md).
    earlier = {key: value for key, value in document.items() if key not in ("host_model", "host_workload", "host_stages")}
    assert "(no host-bound figures in benchmarks/results.json" in report.markdown(earlier)


def template_rows(items: int = 8) -> "pa.Table":
    """Result rows of `items` items x 3 tasks, as a run of the pipeline writes them."""
    import datetime
    import hashlib

    import pyarrow as pa

    from schemas.tables import RESULTS_SCHEMA

    now = datetime.datetime(2026, 11, 22, tzinfo=datetime.timezone.utc)
    rows = [
        {"item_id": f"/in/img_{i}.png", "source_uri": f"/in/img_{i}.png", "content_hash": hashlib.sha256(bytes([i])).hexdigest(),
         "task": task, "text": "x" * (i + 1), "model_id": "m", "prompt_version": "v", "run_id": "r", "created_at": now}
        for i in range(items) for task in ("caption", "detect", "ocr")
    ]
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)


def test_synthetic_history_has_the_rows_asked_for_and_the_planted_answers(tmp_path, monkeypatch):
    import collections

    import pyarrow.parquet as pq

    from benchmarks import history
    from schemas.tables import RESULTS_SCHEMA

    monkeypatch.setattr(history, "NIGHT_ROWS", 2000)  # several nights and files, small
    monkeypatch.setattr(history, "FILE_ROWS", 700)
    template = template_rows()
    plan = history.Plan.of(template)
    assert (len(plan.full), len(plan.partial), len(plan.foreign)) == (2, 2, 2)
    assert (plan.expected_skipped_items, plan.expected_skipped_tasks) == (2, 2 * 3 + 2)
    directory = history.write_history(tmp_path, 5000, template, plan)
    assert history.write_history(tmp_path, 5000, template, plan) == directory  # cached
    assert history.history_rows(directory) == 5000
    table = pq.ParquetDataset(sorted(str(p) for p in directory.glob("night-*/results/*.parquet")), schema=RESULTS_SCHEMA).read()
    assert table.schema.equals(RESULTS_SCHEMA)
    assert len({p.parent.parent.name for p in directory.glob("night-*/results/*.parquet")}) == 3
    hashes = table.column("content_hash").to_pylist()
    template_hashes = set(template.column("content_hash").to_pylist())
    planted = [h for h in hashes if h in template_hashes]
    assert len(planted) == 2 * 3 + 2 + 2 * 3 * 2  # full, partial, foreign (two variants)
    synthetic = [h for h in hashes if h not in template_hashes]
    # A fresh hash per replicated item, shared by its task rows (an item cut at a file's end keeps fewer).
    assert max(collections.Counter(synthetic).values()) == 3 and len(set(synthetic)) >= len(synthetic) / 3


def test_report_renders_the_incremental_section():
    from benchmarks import report

    run = {"peak_rss_mib": 1100.0, "rss_over_no_history": 1.1, "wall_s": 30.0, "run_wall_s": 18.0, "cpu_s": 20.0,
           "skipped_items": 2, "skipped_tasks": 8, "history_candidates": 8, "load_1min_before": 1.5}
    document = {
        "command": "python -m benchmarks.incremental", "date": "2026-11-29", "started_utc": "x", "duration_s": 60,
        "machine": {"cores": 2, "ram_gib": 24}, "expected": {"skipped_items": 2, "skipped_tasks": 8},
        "input": {"items": 8, "tasks": ["caption", "detect", "ocr"], "max_tokens": {}, "kv_cache_memory_bytes": 2**25,
                  "model": "tiny-dense", "template_rows": 24},
        "history": {"night_rows": 10, "file_rows": 5, "row_group_rows": 5, "planted_items": {"full": 2, "partial": 2, "foreign": 2}},
        "baseline_commit": "fe068fd01cdeeb3d", "no_history": {**run, "peak_rss_mib": 1000.0, "rss_over_no_history": 1.0},
        "runs": [{**run, "design": "join", "history_rows": 10_000_000},
                 {**run, "design": "side-input", "history_rows": 10_000_000, "peak_rss_mib": 2500.0, "error": "exit -9, no run summary"}],
        "target": {"history_rows": 10_000_000, "goal": 1.2, "measured": 1.1, "met": True},
    }
    text = report.incremental_markdown(document)
    assert "| 10,000,000 | join (this tree) | 1,100 | 1.100 |" in text
    assert "**exit -9, no run summary**" in text and "at 10,000,000 history rows" in text and "measured 1.100, met" in text
