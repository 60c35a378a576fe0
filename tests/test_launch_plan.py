"""Capacity planner: model arithmetic against published numbers and hand-computed cases."""
from __future__ import annotations

import json

import pytest

from launch import plan
from launch.accelerators import V6E, Chip
from launch.capacity import ROOFLINE, Efficiency, EngineShape, Hardware, TaskLoad, Workload, decode_batch, estimates
from launch.model_shapes import GEMMA4_12B, GEMMA4_26B_A4B, GEMMA4_31B, AttentionGroup, ModelShape
from launch.profiles import PROFILES
from tasks.builtin import select_tasks


def test_gemma4_26b_a4b_shape_reproduces_the_published_sizes():
    # Model card: 25.2 B total, 3.8 B active, vision encoder ~550 M.
    assert GEMMA4_26B_A4B.total_params == pytest.approx(25.2e9, rel=0.01)
    assert GEMMA4_26B_A4B.active_params == pytest.approx(3.8e9, rel=0.02)
    assert GEMMA4_26B_A4B.vision_params == pytest.approx(0.55e9, rel=0.02)
    assert GEMMA4_26B_A4B.experts_touched(1) == pytest.approx(8)
    assert GEMMA4_26B_A4B.experts_touched(256) == pytest.approx(128, abs=0.01)


def test_dense_shapes_reproduce_their_names():
    # The 12B: ~12 B parameters (a published v6e-4 deployment loads it in bf16 in 26.01 GiB of HBM, weights and
    # overhead: DEV Community, "Debugging Deployments with Gemma 12B, TPU v6e-4, MCP and Antigravity CLI"; the
    # matmul weights alone are 23.8 GB); encoder-free, so its "vision" is the 48 x 48 x 3 -> 3,840 patch projection only.
    assert GEMMA4_12B.total_params == pytest.approx(12e9, rel=0.01)
    assert GEMMA4_12B.vision_params == 48 * 48 * 3 * 3840
    assert GEMMA4_31B.total_params == pytest.approx(31e9, rel=0.02)
    assert GEMMA4_12B.active_params == GEMMA4_12B.total_params  # dense


# A toy model whose numbers can be followed by hand: 2 full-attention layers (1 head of 10), hidden 10,
# a dense gated MLP of 10, no experts, vocab 100; vision: 1 layer of width 10, no pooling.
TOY = ModelShape(
    name="toy", hidden=10, vocab=100,
    attention=(AttentionGroup(layers=2, query_heads=1, kv_heads=1, head_dim=10, window=None),),
    dense_mlp=10, experts=0, experts_per_token=0, expert_mlp=0,
    vision_hidden=10, vision_mlp=10, vision_layers=1, vision_pooling=1,
)
TOY_CHIP = Chip("toy", "tpu-toy", "tpu", peak_bf16_flops=1e4, hbm_bytes=1e9, hbm_bytes_per_s=1e3,
                price_per_chip_hour=2.0, native_fp8=False)
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
    small = Chip("toy", "tpu-toy", "tpu", 1e4, hbm_bytes=10_000, hbm_bytes_per_s=1e3, price_per_chip_hour=1,
                 native_fp8=False)
    # 10,000 * 0.9 - 4,800 B of weights = 4,200 B free; 680 B per 17-token sequence -> 6 fit, below 8.
    engine = EngineShape(max_num_seqs=8, block_size=8, weight_bytes=1, kv_bytes=1, vision_tokens=4)
    [roofline, _] = estimates(TOY, engine, Hardware(small, 1), WORKLOAD, REALISTIC, 1, 1.0)
    assert roofline.work.batch == 6


# One task per image, so every number below can be followed by hand: a 300-token shared prefix (template, system
# prompt, 280 image tokens), a 20-token instruction, 101 output tokens (100 decode passes after the prompt's).
ONE_TASK = Workload(images=1000, tasks=(TaskLoad("t", 20, 101),), shared_prefix_tokens=300)


def test_bf16_12b_on_one_v6e_chip_matches_a_hand_computed_case():
    profile = PROFILES["tpu-v6e-1"]
    engine = plan.engine_shape(profile, None)
    assert (engine.weight_bytes, engine.kv_bytes, engine.max_num_seqs, engine.block_size, engine.vision_tokens) == (
        2, 2, 32, 256, 280)
    # Parameters: sliding attention 3,840 x 256 x (2 x 16 + 2 x 8) = 47,185,920 x 40 layers = 1,887,436,800; global
    #   (k_eq_v) 3,840 x 512 x (2 x 16 + 1) = 64,880,640 x 8 = 519,045,120; MLP 3 x 3,840 x 15,360 = 176,947,200 x 48
    #   = 8,493,465,600 -> 10,899,947,520 linear; embedding 262,144 x 3,840 = 1,006,632,960; total 11,906,580,480.
    assert GEMMA4_12B.shared_linear_params == 10_899_947_520
    assert GEMMA4_12B.total_params == 11_906_580_480
    # bf16 weights: (10,899,947,520 + 1,006,632,960) x 2 B = 23,813,160,960 B; + patch projection 26,542,080 x 2 B
    #   = 23,866,245,120 resident. Free: 32e9 x 0.9 - that = 4,933,754,880 B.
    # KV per token (bf16, K and V): sliding 2 x 8 x 256 x 2 B = 8,192 B x 40 layers; global 2 x 1 x 512 x 2 B = 2,048 B
    #   x 8. The longest sequence, 320 + 101 = 421 tokens: 40 x 8,192 x 421 + 8 x 2,048 x 421 = 144,850,944 B
    #   -> 34 fit, so the batch is max_num_seqs = 32.
    hardware = Hardware(V6E, profile.worker.chips)
    assert decode_batch(GEMMA4_12B, engine, hardware, ONE_TASK) == 32
    # Prefill of the 320-token prompt: per token 2 x 10,899,947,520 = 21,799,895,040 FLOPs + attention 4 x (40 x 16
    #   x 256 + 8 x 16 x 512) = 917,504 x mean context 160 = 146,800,640; x 320 = 7,022,942,617,600; + LM head once,
    #   2 x 1,006,632,960 = 2,013,265,920 -> 7,024,955,883,520.
    # Decode, 100 passes at mean context 320 + 101 / 2 = 370.5: (21,799,895,040 + 2,013,265,920 + 917,504 x 370.5)
    #   = 24,153,096,192 x 100 = 2,415,309,619,200 FLOPs. Bytes per pass: weights 23,813,160,960 / 32 sequences
    #   = 744,161,280 + KV (40 x 8,192 + 8 x 2,048) x 370.5 = 127,475,712 -> 871,636,992 x 100 = 87,163,699,200.
    # Vision: 280 soft tokens x 2 x 26,542,080 = 14,863,564,800 FLOPs.
    # Roofline: FLOPs 9,455,129,067,520 / 918e12 = 0.0103 s; bytes / 1,640e9 B/s = 0.0531486 s: memory-bound,
    #   0.05314860 s per image; 1,000 images = 0.01476350 chip-hours = $0.0398614 at $2.70.
    roofline, _ = estimates(GEMMA4_12B, engine, hardware, ONE_TASK, REALISTIC, 1, 2.70)
    assert roofline.work.flops == pytest.approx(9_455_129_067_520)
    assert roofline.work.hbm_bytes == pytest.approx(87_163_699_200)
    assert roofline.seconds_per_image == pytest.approx(0.05314860, rel=1e-6)
    assert roofline.chip_hours == pytest.approx(0.01476350, rel=1e-6)
    assert roofline.cost_usd == pytest.approx(0.0398614, rel=1e-5)
    # At 3,000 output tokens the longest sequence (3,320) fills the 1,024-token window: 40 x 8,192 x 1,024 + 8 x 2,048
    #   x 3,320 = 389,939,200 B -> 12 sequences fit in the 4,933,754,880 B left.
    long_ocr = Workload(images=1, tasks=(TaskLoad("ocr", 20, 3000),), shared_prefix_tokens=300)
    assert decode_batch(GEMMA4_12B, engine, hardware, long_ocr) == 12


def test_bf16_26b_a4b_on_a_v6e_8_matches_a_hand_computed_case():
    profile = PROFILES["tpu-v6e-8"]
    engine = plan.engine_shape(profile, None)
    assert (engine.weight_bytes, engine.kv_bytes, engine.max_num_seqs) == (2, 2, 512)
    # Linear parameters every token uses: sliding 2,816 x 256 x 48 = 34,603,008 x 25 = 865,075,200; global 2,816 x 512
    #   x 34 = 49,020,928 x 5 = 245,104,640; dense MLP 3 x 2,816 x 2,112 + router 2,816 x 128 = 18,202,624 x 30
    #   = 546,078,720 -> 1,656,258,560. Experts: 3 x 2,816 x 704 = 5,947,392 each; 8 active x 30 layers adds
    #   1,427,374,080 -> 3,083,632,640 active; all 30 x 128 = 22,837,985,280.
    assert GEMMA4_26B_A4B.active_linear_params == 3_083_632_640
    # All weights bf16: (1,656,258,560 + 22,837,985,280 + 738,197,504) x 2 = 50,464,882,688 B; + vision 544,942,080 x 2
    #   -> 51,554,766,848 resident. Free: 8 x 32e9 x 0.9 - that = 178,845,233,152 B. KV of 421 tokens: 25 x 8,192 x 421
    #   + 5 x (2 x 2 x 512 x 2 = 4,096) x 421 = 94,843,680 B -> 1,885 fit: the batch is max_num_seqs = 512, which
    #   touches all 128 experts per layer (128 x (1 - (120/128)^512) = 128).
    hardware = Hardware(V6E, profile.worker.chips)
    assert decode_batch(GEMMA4_26B_A4B, engine, hardware, ONE_TASK) == 512
    # Prefill: 320 x (2 x 3,083,632,640 + 4 x (25 x 16 x 256 + 5 x 16 x 512) = 573,440 x 160) + LM head 1,476,395,008
    #   = 320 x 6,259,015,680 + 1,476,395,008 = 2,004,361,412,608.
    # Decode: 100 x (6,167,265,280 + 1,476,395,008 + 573,440 x 370.5) = 785,611,980,800 FLOPs; bytes 100 x
    #   (50,464,882,688 / 512 = 98,564,224 + (25 x 8,192 + 5 x 4,096) x 370.5 = 83,466,240) = 18,203,046,400.
    # Vision tower: 280 x 9 = 2,520 patches x (2 x 544,942,080 + 4 x 27 x 1,152 x 2,520) = 3,536,599,449,600 FLOPs.
    # Roofline: 6,326,572,843,008 FLOPs / (8 x 918e12) = 0.000861 s; 18,203,046,400 B / (8 x 1,640e9) = 0.00138743 s:
    #   memory-bound. 1,000 images: 0.000385396 worker-hours x 8 chips = 0.00308317 chip-hours.
    roofline, _ = estimates(GEMMA4_26B_A4B, engine, hardware, ONE_TASK, REALISTIC, 1, 2.70)
    assert roofline.work.flops == pytest.approx(6_326_572_843_008)
    assert roofline.work.hbm_bytes == pytest.approx(18_203_046_400)
    assert roofline.seconds_per_image == pytest.approx(0.00138743, rel=1e-5)
    assert roofline.chip_hours == pytest.approx(0.00308317, rel=1e-5)


def test_the_l4_profile_is_planned_with_fp8_weights_and_every_other_in_bf16():
    for name, profile in PROFILES.items():
        assert plan.engine_shape(profile, None).weight_bytes == (1 if name == "gpu-l4" else 2)


def test_roofline_is_never_slower_than_realistic():
    profile = PROFILES["tpu-v6e-4"]
    load = plan.workload(1000, 1.0, select_tasks("ocr,caption,detect"), 280, plan.EXPECTED_OUTPUT_TOKENS)
    hardware = Hardware(profile.worker.chip, profile.worker.chips)
    roofline, realistic = estimates(GEMMA4_26B_A4B, plan.engine_shape(profile, None), hardware, load, REALISTIC, 4, 2.7)
    assert ROOFLINE.overlap and roofline.seconds_per_image < realistic.seconds_per_image
    assert roofline.chip_hours < realistic.chip_hours


def test_report_labels_benchmark_inputs_as_cpu_measured(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"pipeline_efficiency": 0.9, "prefix_reuse_ratio": 0.75}))
    plan.main(["--items", "1000", "--results", str(results)])
    out = capsys.readouterr().out
    assert "pipeline efficiency 0.90 (CPU-measured" in out
    assert "0.75 of the shareable prefix (CPU-measured" in out and "not on v6e" in out
    assert "roofline" in out and "realistic" in out and "cost, USD" in out


def test_report_states_its_defaults_without_benchmark_results(tmp_path, capsys):
    plan.main(["--items", "10", "--pages-per-item", "3", "--tasks", "ocr", "--results", str(tmp_path / "none.json")])
    out = capsys.readouterr().out
    assert "10 items x 3 pages/item = 30 images" in out
    assert f"pipeline efficiency {plan.DEFAULT_PIPELINE_EFFICIENCY:.2f} (default" in out
    assert "(default: not measured)" in out


def test_the_12b_on_v6e_is_placed_beside_the_published_measurements(tmp_path, capsys):
    plan.main(["--items", "100", "--profile", "tpu-v6e-1", "--results", str(tmp_path / "none.json")])
    out = capsys.readouterr().out
    assert "Published, Gemma 4 12B on v6e-1" in out and "~64 req/s at 1,024-token contexts" in out
    assert "requests/s per worker realistic" in out
    plan.main(["--items", "100", "--profile", "tpu-v6e-4", "--results", str(tmp_path / "none.json")])
    assert "Published" not in capsys.readouterr().out  # the 26B-A4B: no published measurement to compare


@pytest.mark.parametrize("name, billing", [("tpu-v6e-8-31b", "per TPU chip-hour and not for worker CPU and memory"),
                                           ("gpu-h100", "also bills the GPU workers' vCPU, memory and disk")])
def test_the_billing_statement_follows_the_platform(name, billing, tmp_path, capsys):
    plan.main(["--items", "100", "--profile", name, "--results", str(tmp_path / "none.json")])
    out = capsys.readouterr().out
    assert billing in out
    assert "all-reduce traffic is not modelled" in out or PROFILES[name].worker.chips == 1


def test_a_task_without_an_expected_length_must_be_given_one():
    with pytest.raises(ValueError, match="--output-tokens"):
        plan.workload(1, 1.0, select_tasks("ocr"), 280, {})


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_launch_profile_can_be_planned(name, tmp_path, capsys):
    profile = PROFILES[name]
    plan.main(["--items", "100", "--profile", name, "--results", str(tmp_path / "none.json")])
    assert f"{name}: {profile.worker.chips} x {profile.worker.chip.name} per worker" in capsys.readouterr().out
