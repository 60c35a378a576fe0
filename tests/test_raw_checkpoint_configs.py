"""Real checkpoint shapes as Google publishes them, not as transformers re-serialises them.

Google's `config.json` states the full-attention layers' shape with two keys that
transformers' config classes pop and turn into `per_layer_config` when they load it
(transformers src/transformers/models/gemma4/configuration_gemma4.py, and
models/gemma4_unified/configuration_gemma4_unified.py, `Gemma4TextConfig.__post_init__`:
`global_head_dim` (default 512) and `num_global_key_value_heads`, the latter only with
`attention_k_eq_v`). `to_dict()` then writes `per_layer_config` and no longer the raw keys,
so a test built from the classes (tests/test_checkpoint_profiles.py) never sees what a
downloaded checkpoint holds. The raw configs below are written key by key from those
classes' arguments and the converters' values (models/gemma4/convert_gemma4_weights.py,
models/gemma4_unified/convert_gemma4_unified_weights.py `_VARIANTS`), as the raw file
spells them. The unified 12B's has no `vision_config.num_soft_tokens`: transformers'
converter writes none, and vLLM 0.32 reads it unguarded
(vllm/model_executor/models/gemma4_unified.py, `get_mm_max_tokens_per_item`).
"""
from __future__ import annotations

import json
import shutil

import pytest

from engine.checkpoint_shape import CheckpointShape
from engine.profiles import GiB, fit_to_checkpoint, resolve
from tests.test_checkpoint_profiles import real_configs

FIVE_TO_ONE = ["sliding_attention"] * 5 + ["full_attention"]


def raw(architecture: str, model_type: str, vision: dict, **text) -> dict:
    return {"architectures": [architecture], "model_type": model_type, "dtype": "bfloat16",
            "text_config": {"model_type": f"{model_type}_text", "head_dim": 256, **text}, "vision_config": vision}


LARGE = dict(attention_k_eq_v=True, use_bidirectional_attention="vision", num_kv_shared_layers=0, sliding_window=1024,
             global_head_dim=512, hidden_size_per_layer_input=0)
RAW = {
    "E2B": raw("Gemma4ForConditionalGeneration", "gemma4", {"default_output_length": 280},
               hidden_size=1536, hidden_size_per_layer_input=256, num_hidden_layers=35, sliding_window=512,
               layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7, num_attention_heads=8,
               num_key_value_heads=1, global_head_dim=512, num_kv_shared_layers=20),
    "E4B": raw("Gemma4ForConditionalGeneration", "gemma4", {"default_output_length": 280},
               hidden_size=2560, hidden_size_per_layer_input=256, num_hidden_layers=42, sliding_window=512,
               layer_types=FIVE_TO_ONE * 7, num_attention_heads=8, num_key_value_heads=2, global_head_dim=512,
               num_kv_shared_layers=18),
    "26B-A4B": raw("Gemma4ForConditionalGeneration", "gemma4", {"default_output_length": 280},
                   hidden_size=2816, num_hidden_layers=30, layer_types=FIVE_TO_ONE * 5, num_attention_heads=16,
                   num_key_value_heads=8, num_global_key_value_heads=2, **LARGE),
    "31B": raw("Gemma4ForConditionalGeneration", "gemma4", {"default_output_length": 280},
               hidden_size=5376, num_hidden_layers=60, layer_types=FIVE_TO_ONE * 10, num_attention_heads=32,
               num_key_value_heads=16, num_global_key_value_heads=4, **LARGE),
    "12B": raw("Gemma4UnifiedForConditionalGeneration", "gemma4_unified", {"patch_size": 16, "pooling_kernel_size": 3},
               hidden_size=3840, num_hidden_layers=48, layer_types=FIVE_TO_ONE * 8, num_attention_heads=16,
               num_key_value_heads=8, num_global_key_value_heads=1, **LARGE),
}


@pytest.mark.parametrize("family", list(RAW))
def test_kv_sizing_reads_googles_raw_keys_as_transformers_does(family):
    """The raw file and transformers' re-serialisation of the same model have the same KV per token."""
    config, size = real_configs()[family]
    from_raw = CheckpointShape.from_config(RAW[family], int(size))
    from_transformers = CheckpointShape.from_config(config, int(size))
    assert from_raw.cached_layers == from_transformers.cached_layers
    for windowed in (True, False):
        assert from_raw.kv_bytes_per_sequence(8192, 2, windowed) == from_transformers.kv_bytes_per_sequence(8192, 2, windowed)


def test_the_cpu_profile_sizes_a_raw_e2b_by_its_512_wide_global_heads():
    # E2B keeps KV in 15 layers: 12 sliding (1 KV head x 256, 512-token window) and 3 global (1 x 512, every token).
    e2b = CheckpointShape.from_config(RAW["E2B"], int(10.2e9))
    assert e2b.kv_bytes_per_sequence(8192, 2, windowed=True) == 2 * 2 * (12 * 256 * 512 + 3 * 512 * 8192)
    fitted = fit_to_checkpoint(resolve("cpu", checkpoint=e2b, overrides={"dtype": "bfloat16"}), e2b, 64 * GiB)
    assert fitted.engine_args["kv_cache_memory_bytes"] == fitted.engine_args["max_num_seqs"] * e2b.kv_bytes_per_sequence(
        8192, 2, windowed=True)


@pytest.mark.parametrize("processor, budget", [(None, 280), ({"image_processor": {"max_soft_tokens": 560}}, 560)])
def test_a_unified_config_without_num_soft_tokens_gets_its_processors_budget(processor, budget):
    shape = CheckpointShape.from_config(RAW["12B"], 26 * GiB, processor)
    assert shape.lacks_num_soft_tokens and shape.vision_tokens == budget
    args = resolve("tpu-v6e-1-gemma4-12b", checkpoint=shape).engine_args
    assert args["hf_overrides"] == {"vision_config": {"num_soft_tokens": budget}}
    # A tower checkpoint, or a unified one that has the key, is left as it is.
    assert "hf_overrides" not in resolve("tpu-v6e-4-gemma4-26b-a4b", checkpoint=CheckpointShape.from_config(
        RAW["26B-A4B"], int(50.4e9))).engine_args
    complete = {**RAW["12B"], "vision_config": {**RAW["12B"]["vision_config"], "num_soft_tokens": 280}}
    assert "hf_overrides" not in resolve("tpu-v6e-1-gemma4-12b", checkpoint=CheckpointShape.from_config(
        complete, 26 * GiB)).engine_args


@pytest.mark.engine
def test_vllm_starts_a_unified_checkpoint_whose_config_lacks_num_soft_tokens(tmp_path, private_model_cache):
    """The tiny 12B with the key removed, as transformers' converter writes it: vLLM starts with the supplied value.

    Through the engine registry, as a job starts it (a raw `vllm.LLM` here would tear down the process's
    distributed groups when collected, under the session's other in-process engines: engine.local).
    """
    from PIL import Image

    from engine.api import EngineRequest, EngineSettings
    from engine.prompts import Sampling
    from engine.registry import ENGINES
    from tiny_model.checkpoint import ensure_checkpoint

    model = shutil.copytree(ensure_checkpoint("tiny-12b-unified"), tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    budget = config["vision_config"].pop("num_soft_tokens")
    (model / "config.json").write_text(json.dumps(config))
    shape = CheckpointShape.read(str(model))
    assert shape.lacks_num_soft_tokens and shape.vision_tokens == budget  # the tiny processor's documented budget
    args = resolve("cpu-tiny", checkpoint=shape).engine_args
    assert args["hf_overrides"]["vision_config"]["num_soft_tokens"] == budget
    engine = ENGINES.acquire(EngineSettings(model_path=str(model), engine_args=args, max_in_flight=1, structured_output=False))
    try:  # without the override, vLLM 0.32 fails at start: 'Gemma4UnifiedVisionConfig' object has no attribute 'num_soft_tokens'
        [answer] = engine.submit(Image.new("RGB", (64, 48), "white"), "lacks-num-soft-tokens",
                                 [EngineRequest("Describe the image.", 2, Sampling())])
        assert answer.result(timeout=600).generated_tokens > 0
    finally:
        ENGINES.release(engine)
