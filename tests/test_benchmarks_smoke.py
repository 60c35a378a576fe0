"""The benchmark's metric helpers, as pure functions (no engine, no timing: benchmarks are never tests)."""
from __future__ import annotations

from benchmarks.measure import TaskRecord, prefix_reuse, ratio
from benchmarks.server import chat_messages, server_flags
from transforms.prompts import TASKS

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
    messages = chat_messages(TASKS["caption"], "data:image/png;base64,AAAA")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"][0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert messages[1]["content"][1]["text"] == TASKS["caption"].instruction


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
