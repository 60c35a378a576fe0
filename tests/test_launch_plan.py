"""Capacity planner: model arithmetic against published numbers and a hand-computed case."""
from __future__ import annotations

import json

import pytest

from launch import plan
from launch.capacity import ROOFLINE, Efficiency, EngineShape, Hardware, TaskLoad, Workload, estimates
from launch.model_shapes import GEMMA4_26B_A4B, AttentionGroup, ModelShape
from launch.profiles import PROFILES
from launch.tpu import Generation


def test_gemma4_26b_a4b_shape_reproduces_the_published_sizes():
    # Model card: 25.2 B total, 3.8 B active, vision encoder ~550 M.
    assert GEMMA4_26B_A4B.total_params == pytest.approx(25.2e9, rel=0.01)
    assert GEMMA4_26B_A4B.active_params == pytest.approx(3.8e9, rel=0.02)
    assert GEMMA4_26B_A4B.vision_params == pytest.approx(0.55e9, rel=0.02)
    assert GEMMA4_26B_A4B.experts_touched(1) == pytest.approx(8)
    assert GEMMA4_26B_A4B.experts_touched(256) == pytest.approx(128, abs=0.01)


# A toy model whose numbers can be followed by hand: 2 full-attention layers (1 head of 10), hidden 10,
# a dense gated MLP of 10, no experts, vocab 100; vision: 1 layer of width 10, no pooling.
TOY = ModelShape(
    name="toy", hidden=10, vocab=100,
    attention=(AttentionGroup(layers=2, query_heads=1, kv_heads=1, head_dim=10, window=None),),
    dense_mlp=10, experts=0, experts_per_token=0, expert_mlp=0,
    vision_hidden=10, vision_mlp=10, vision_layers=1, vision_pooling=1,
)
TOY_CHIP = Generation("toy", "tpu-toy", "ct-toy-", peak_bf16_flops=1e4, hbm_bytes=1e9, hbm_bytes_per_s=1e3,
                      price_per_chip_hour=2.0)
ENGINE = EngineShape(max_num_seqs=4, block_size=8, weight_bytes=1, kv_bytes=1, vision_tokens=4)
WORKLOAD = Workload(images=100, tasks=(TaskLoad("a", 2, 5), TaskLoad("b", 2, 1)), shared_prefix_tokens=10)
REALISTIC = Efficiency(mfu=0.5, hbm_efficiency=0.5, pipeline_efficiency=0.8, prefix_reuse_ratio=0.5,
                       startup_s=360, overlap=False)


def test_planner_matches_a_hand_computed_case():
    # Parameters: attention per layer 10*10*(2*1 + 2*1) = 400, dense MLP 3*10*10 = 300, router 0
    #   -> shared linear 2 * 700 = 1,400; embedding 100*10 = 1,000; vision 4*10^2 + 3*10*10 = 700.
    assert (TOY.shared_linear_params, TOY.embedding_params, TOY.vision_params) == (1400, 1000, 700)
    # Decode batch: HBM 1e9 * 0.9 minus weights (1,400 * 1 B + 1,000 * 2 B) and vision (700 * 2 B) leaves
    #   899,995,200 B; the longest sequence (12 + 5 = 17 tokens) needs 2 layers * 2 * 10 * 17 = 680 B
    #   -> 1,323,522 fit, so the batch is max_num_seqs = 4.
    # Prompts: 10 shared + 2 suffix = 12 per task. LM head 2 * 1,000 = 2,000 FLOPs per logits row;
    #   per token 2 * 1,400 = 2,800 FLOPs; attention 4 * 2 layers * 1 head * 10 * context = 80 * context.
    # Vision (both columns): 4 patches * (2 * 700 + 4 * 1 * 10 * 4) = 4 * 1,560 = 6,240 FLOPs.
    # Decode (both columns): task a: 4 passes at context 12 + 5/2 = 14.5:
    #   FLOPs 4 * (2,800 + 2,000 + 80 * 14.5) = 4 * 5,960 = 23,840;
    #   bytes 4 * (3,400 B weights / batch 4 = 850 + KV 2 * 20 * 14.5 = 580) = 4 * 1,430 = 5,720. Task b: 0 passes.
    #
    # Roofline: whole blocks reused: 10 // 8 * 8 = 8 tokens for task b.
    #   prefill a: 12 * (2,800 + 80 * (0 + 12) / 2) + 2,000 = 12 * 3,280 + 2,000 = 41,360
    #   prefill b: (12 - 8) * (2,800 + 80 * (8 + 12) / 2) + 2,000 = 4 * 3,600 + 2,000 = 16,400
    #   FLOPs 6,240 + 57,760 + 23,840 = 87,840 -> compute 87,840 / 1e4 = 8.784 s; memory 5,720 / 1e3 = 5.72 s
    #   overlapped: 8.784 s per image; 100 images = 878.4 s = 0.244 worker-hours; 2 workers: 0.122 h wall;
    #   0.244 chip-hours (1 chip, no start-up) at $2 = $0.488.
    # Realistic: reuse 0.5 of the 10-token prefix = 5 tokens (below the 8-token block bound).
    #   prefill b: (12 - 5) * (2,800 + 80 * (5 + 12) / 2) + 2,000 = 7 * 3,480 + 2,000 = 26,360
    #   FLOPs 6,240 + 41,360 + 26,360 + 23,840 = 97,800 -> compute 97,800 / (1e4 * 0.5) = 19.56 s;
    #   memory 5,720 / (1e3 * 0.5) = 11.44 s; not overlapped 31.0 s; / pipeline 0.8 = 38.75 s per image;
    #   100 images = 1.076389 worker-hours; wall 0.1 h start-up + 1.076389 / 2 = 0.638194 h;
    #   chip-hours 1.076389 + 2 workers * 0.1 h = 1.276389; cost $2.552778.
    roofline, realistic = estimates(TOY, ENGINE, Hardware(TOY_CHIP, 1), WORKLOAD, REALISTIC, 2, 2.0)

    assert roofline.work.batch == realistic.work.batch == 4
    assert (roofline.work.prefill_tokens, roofline.work.cached_tokens, roofline.work.decode_tokens) == (16, 8, 4)
    assert roofline.work.flops == pytest.approx(87_840)
    assert roofline.work.hbm_bytes == pytest.approx(5_720)
    assert roofline.seconds_per_image == pytest.approx(8.784)
    assert roofline.worker_hours == pytest.approx(0.244)
    assert roofline.wall_hours == pytest.approx(0.122)
    assert roofline.chip_hours == pytest.approx(0.244)
    assert roofline.cost_usd == pytest.approx(0.488)

    assert (realistic.work.prefill_tokens, realistic.work.cached_tokens) == (19, 5)
    assert realistic.work.flops == pytest.approx(97_800)
    assert realistic.seconds_per_image == pytest.approx(38.75)
    assert realistic.worker_hours == pytest.approx(1.076389, rel=1e-5)
    assert realistic.wall_hours == pytest.approx(0.638194, rel=1e-5)
    assert realistic.chip_hours == pytest.approx(1.276389, rel=1e-5)
    assert realistic.cost_usd == pytest.approx(2.552778, rel=1e-5)


def test_decode_batch_shrinks_to_what_hbm_holds():
    small = Generation("toy", "tpu-toy", "ct-toy-", 1e4, hbm_bytes=10_000, hbm_bytes_per_s=1e3, price_per_chip_hour=1)
    # 10,000 * 0.9 - 4,800 B of weights = 4,200 B free; 680 B per 17-token sequence -> 6 fit, below 8.
    engine = EngineShape(max_num_seqs=8, block_size=8, weight_bytes=1, kv_bytes=1, vision_tokens=4)
    [roofline, _] = estimates(TOY, engine, Hardware(small, 1), WORKLOAD, REALISTIC, 1, 1.0)
    assert roofline.work.batch == 6


def test_roofline_is_never_slower_than_realistic():
    profile = PROFILES["tpu-v6e-4"]
    load = plan.workload(1000, 1.0, ("ocr", "caption", "detect"), 280, plan.EXPECTED_OUTPUT_TOKENS)
    hardware = Hardware(profile.slice.generation, profile.slice.chips)
    roofline, realistic = estimates(GEMMA4_26B_A4B, plan.engine_shape(profile, None), hardware, load, REALISTIC, 4, 2.7)
    assert ROOFLINE.overlap and roofline.seconds_per_image < realistic.seconds_per_image
    assert roofline.chip_hours < realistic.chip_hours


def test_report_uses_measured_efficiency_when_the_benchmarks_have_it(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"pipeline_efficiency": 0.9, "prefix_reuse_ratio": 0.75}))
    plan.main(["--items", "1000", "--results", str(results)])
    out = capsys.readouterr().out
    assert "pipeline efficiency 0.90 (measured" in out
    assert "0.75 of the shareable prefix (measured" in out
    assert "roofline" in out and "realistic" in out and "cost, USD on-demand" in out


def test_report_states_its_defaults_without_benchmark_results(tmp_path, capsys):
    plan.main(["--items", "10", "--pages-per-item", "3", "--tasks", "ocr", "--results", str(tmp_path / "none.json")])
    out = capsys.readouterr().out
    assert "10 items x 3 pages/item = 30 images" in out
    assert f"pipeline efficiency {plan.DEFAULT_PIPELINE_EFFICIENCY:.2f} (default" in out
    assert "(default: not measured)" in out


def test_a_task_without_an_expected_length_must_be_given_one():
    with pytest.raises(ValueError, match="--output-tokens"):
        plan.workload(1, 1.0, ("ocr",), 280, {})


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_launch_profile_can_be_planned(name, tmp_path, capsys):
    plan.main(["--items", "100", "--profile", name, "--results", str(tmp_path / "none.json")])
    assert f"{name}: {PROFILES[name].slice.chips} x v6e per worker" in capsys.readouterr().out
