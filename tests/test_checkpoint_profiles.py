"""Engine profiles against real Gemma 4 checkpoint shapes: refusals with the profile to use, and `cpu` sizing.

The configs are the real families', built with transformers' own config classes from the values in
its conversion scripts (models/gemma4/convert_gemma4_weights.py `_VARIANTS`,
models/gemma4_unified/convert_gemma4_unified_weights.py `_VARIANTS`), so `config.json` reads exactly
as a downloaded checkpoint's. Weight sizes are the published parameter counts in bf16.
"""
from __future__ import annotations

import pytest
import torch
from apache_beam.options.pipeline_options import PipelineOptions

from configuration.options import JobConfig
from engine import profiles as engine_profiles
from engine.checkpoint_shape import CheckpointShape
from engine.profiles import GiB, CheckpointRefused, fit_to_checkpoint, resolve

ROPE = {
    "full_attention": {"rope_theta": 1_000_000.0, "rope_type": "proportional", "partial_rotary_factor": 0.25},
    "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"},
}
LARGE_TEXT = dict(attention_k_eq_v=True, use_bidirectional_attention="vision", num_kv_shared_layers=0,
                  sliding_window=1024, final_logit_softcapping=30.0, hidden_size_per_layer_input=0, rope_parameters=ROPE)


def gemma4(**text) -> dict:
    from transformers import Gemma4Config

    return Gemma4Config(text_config=text, vision_config={}, architectures=["Gemma4ForConditionalGeneration"]).to_dict()


def real_configs() -> dict[str, tuple[dict, float]]:
    """family -> (config.json content, weight bytes)."""
    from transformers import Gemma4UnifiedConfig

    five_to_one = ["sliding_attention"] * 5 + ["full_attention"]
    return {
        "E2B": (gemma4(hidden_size=1536, hidden_size_per_layer_input=256, intermediate_size=6144, num_hidden_layers=35,
                       layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7, num_attention_heads=8,
                       num_key_value_heads=1, num_kv_shared_layers=20, use_double_wide_mlp=True,
                       final_logit_softcapping=30.0, rope_parameters=ROPE), 5.1e9 * 2),
        "E4B": (gemma4(hidden_size=2560, hidden_size_per_layer_input=256, intermediate_size=10240, num_hidden_layers=42,
                       layer_types=five_to_one * 7, num_attention_heads=8, num_key_value_heads=2, global_head_dim=512,
                       num_kv_shared_layers=18, final_logit_softcapping=30.0, rope_parameters=ROPE), 8.0e9 * 2),
        "26B-A4B": (gemma4(hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, layer_types=five_to_one * 5,
                           num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2,
                           enable_moe_block=True, num_experts=128, moe_intermediate_size=704, top_k_experts=8,
                           **LARGE_TEXT), 25.2e9 * 2),
        "31B": (gemma4(hidden_size=5376, intermediate_size=21504, num_hidden_layers=60, layer_types=five_to_one * 10,
                       num_attention_heads=32, num_key_value_heads=16, num_global_key_value_heads=4, **LARGE_TEXT),
                30.7e9 * 2),
        "12B": (Gemma4UnifiedConfig(
            text_config=dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, layer_types=five_to_one * 8,
                             num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=1, **LARGE_TEXT),
            vision_config={}, architectures=["Gemma4UnifiedForConditionalGeneration"]).to_dict(), 26 * GiB),
    }


@pytest.fixture(scope="module")
def shapes() -> dict[str, CheckpointShape]:
    return {name: CheckpointShape.from_config(config, int(size)) for name, (config, size) in real_configs().items()}


def test_kv_arithmetic_reads_per_layer_heads_windows_and_sharing(shapes):
    # 26B-A4B, bf16, 4,096 tokens, every layer keeping every token (cpu-tiny's manager):
    # 25 x 2 x 8 x 256 + 5 x 2 x 2 x 512 = 112,640 elements/token -> 0.92 GB ("about 0.9 GB", issue 14).
    assert shapes["26B-A4B"].kv_bytes_per_sequence(4096, 2, windowed=False) == 4096 * 2 * (25 * 2 * 8 * 256 + 5 * 2 * 2 * 512)
    # E2B: 15 of 35 layers keep KV (20 are shared), 12 sliding at 512 tokens, 3 global at 512-wide heads.
    e2b = shapes["E2B"]
    assert (len(e2b.cached_layers), e2b.kv_shared_layers) == (15, 20)
    assert e2b.kv_bytes_per_sequence(4096, 2, windowed=True) == 2 * 2 * (12 * 256 * 512 + 3 * 512 * 4096)


@pytest.mark.parametrize("family", ["E2B", "E4B", "26B-A4B", "31B", "12B"])
def test_cpu_tiny_refuses_real_checkpoints_naming_the_profile_to_use(shapes, family):
    with pytest.raises(CheckpointRefused, match="cpu-tiny is sized for the project's tiny random checkpoints") as refused:
        resolve("cpu-tiny", checkpoint=shapes[family])
    expected = "--engine_profile cpu" if family in ("E2B", "E4B") else "tpu-v6e-4-gemma4-26b-a4b"
    assert expected in str(refused.value)


@pytest.mark.parametrize("family", ["26B-A4B", "31B", "12B"])
def test_cpu_refuses_bidirectional_image_attention_it_would_compute_causally(shapes, family):
    with pytest.raises(CheckpointRefused, match="bidirectionally over image tokens.*silently wrong.*TPU profile"):
        resolve("cpu", checkpoint=shapes[family])


@pytest.mark.parametrize("family, memory", [("E2B", 24 * GiB), ("E4B", 24 * GiB), ("E2B", 16 * GiB)])
def test_cpu_sizes_kv_and_sequences_from_the_checkpoint_and_the_machine(shapes, family, memory):
    profile = fit_to_checkpoint(engine_profiles.PROFILES["cpu"], shapes[family], memory_bytes=memory)
    args = profile.engine_args
    per_sequence = shapes[family].kv_bytes_per_sequence(args["max_model_len"], 2, windowed=True)
    assert 1 <= args["max_num_seqs"] <= 64
    assert args["kv_cache_memory_bytes"] == args["max_num_seqs"] * per_sequence
    assert shapes[family].weight_bytes + args["kv_cache_memory_bytes"] + 2 * GiB <= memory
    assert args["disable_hybrid_kv_cache_manager"] is False  # KV-shared layers need vLLM's hybrid manager
    assert profile.max_in_flight >= args["max_num_seqs"]


def test_cpu_is_never_used_unsized():
    with pytest.raises(ValueError, match="sized from the checkpoint"):
        resolve("cpu")


def test_cpu_refuses_a_checkpoint_the_machine_cannot_hold(shapes):
    with pytest.raises(CheckpointRefused, match=r"needs 14\.9 GiB of weights.*this machine has 16\.0 GiB"):
        fit_to_checkpoint(engine_profiles.PROFILES["cpu"], shapes["E4B"], memory_bytes=16 * GiB)


def test_vllm_cpu_attention_indeed_ignores_bidirectional_image_ranges():
    """The fact the refusal rests on, asked of the installed vLLM (this test fails once vLLM adds support)."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.selector import AttentionSelectorConfig

    assert CPUAttentionBackend.supports_mm_prefix() is False
    wanted = AttentionSelectorConfig(head_size=256, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=32,
                                     use_mm_prefix=True)
    # The CPU platform hands out its backend anyway, without refusing: nothing in vLLM would stop the run.
    assert CpuPlatform.get_attn_backend_cls(None, wanted).endswith("CPUAttentionBackend")
    assert engine_profiles._cpu_attention_is_causal_over_images() is True


def config(*args: str) -> JobConfig:
    return JobConfig.from_options(PipelineOptions(["--output", "out", "--input", "a", *args]), "/m", "model", False)


def test_vision_tokens_outside_gemma4s_budgets_are_refused_at_option_parsing(capsys):
    with pytest.raises(SystemExit) as exit_:
        config("--vision_tokens", "300")
    assert exit_.value.code == 2
    assert "argument --vision_tokens: invalid choice: 300 (choose from 70, 140, 280, 560, 1120)" in capsys.readouterr().err


def test_the_chosen_vision_budget_reaches_the_engines_memory_planning():
    engine = config("--vision_tokens", "560").engine
    assert engine.vision_tokens == 560
    assert engine.engine_args["mm_processor_kwargs"] == {"max_soft_tokens": 560}  # what vLLM profiles memory with
    assert "mm_processor_kwargs" not in config().engine.engine_args  # the checkpoint's default budget


def test_thinking_waits_for_the_thought_before_constraining_json():
    on = config("--thinking", "on").engine
    assert on.thinking and on.engine_args["structured_outputs_config"]["reasoning_parser"] == "gemma4_thinking"
    assert "reasoning_parser" not in config().engine.engine_args["structured_outputs_config"]
    assert "structured_outputs_config" not in config("--thinking", "on", "--engine_profile", "tpu-v6e-4-gemma4-26b-a4b").engine.engine_args
    assert config("--thinking", "on").run.prompt_version.endswith("+thinking")
