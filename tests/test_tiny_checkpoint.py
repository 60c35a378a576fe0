"""The offline tiny Gemma 4 checkpoints: one per architecture, deterministic, loadable by transformers, cached.

No engine here: vLLM loading is covered by tests/test_gemma4_families.py. Family facts come from
transformers' conversion scripts (models/gemma4/convert_gemma4_weights.py, models/gemma4_unified/
convert_gemma4_unified_weights.py), whose config values these checks name.
"""
import hashlib
import json
import random
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from tiny_model import checkpoint as tiny_checkpoint
from tiny_model.checkpoint import BUILDER_VERSION, DEFAULT_PRESET, EXPECTED_FILES, PRESETS, build_checkpoint, ensure_checkpoint

MESSAGES = [
    {"role": "system", "content": "SYSTEM-PROMPT"},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "TASK-TEXT"}]},
]
FAMILIES = ("tiny-e2b", "tiny-26b-a4b", "tiny-31b", "tiny-12b-unified")


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return ensure_checkpoint(DEFAULT_PRESET)


@pytest.fixture(scope="module")
def processor(checkpoint: Path):
    return AutoProcessor.from_pretrained(checkpoint)


def file_hashes(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-12b-unified"])  # both model classes
def test_two_builds_are_byte_identical(tmp_path: Path, preset: str):
    first = file_hashes(build_checkpoint(tmp_path / "a", preset))
    second = file_hashes(build_checkpoint(tmp_path / "b", preset))
    assert sorted(first) == sorted(EXPECTED_FILES)
    assert first == second


def text_config(preset: str):
    return AutoConfig.from_pretrained(ensure_checkpoint(preset)).get_text_config()


@pytest.mark.parametrize("preset", FAMILIES)
def test_config_is_its_familys_class_with_token_ids_matching_the_tokenizer(preset: str):
    directory = ensure_checkpoint(preset)
    config = AutoConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert config.architectures == [PRESETS[preset].architecture]
    assert type(config).__name__ == PRESETS[preset].architecture.replace("ForConditionalGeneration", "Config")
    assert config.get_text_config().vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids(["<eos>", "<turn|>"])  # the script's [1, 106]
    for attribute, token in [
        ("image_token_id", "<|image|>"),
        ("boi_token_id", "<|image>"),
        ("eoi_token_id", "<image|>"),
        ("video_token_id", "<|video|>"),
        ("audio_token_id", "<|audio|>"),
    ]:
        assert getattr(config, attribute) == tokenizer.convert_tokens_to_ids(token)


def test_e_series_has_per_layer_embeddings_kv_sharing_and_an_audio_tower():
    config = AutoConfig.from_pretrained(ensure_checkpoint("tiny-e2b"))
    text = config.text_config
    assert text.hidden_size_per_layer_input > 0 and text.use_double_wide_mlp  # E2B: 256, True
    assert 0 < text.num_kv_shared_layers < text.num_hidden_layers  # E2B: 20 of 35
    assert text.layer_types[:5] == ["sliding_attention"] * 4 + ["full_attention"]  # E2B's 4:1 pattern
    assert text.use_bidirectional_attention is None and not text.attention_k_eq_v
    assert config.audio_config is not None and config.vision_config.use_clipped_linears
    shared = text.layer_types[-text.num_kv_shared_layers:]
    own = text.layer_types[: -text.num_kv_shared_layers]
    assert set(shared) <= set(own)  # every shared layer has an earlier layer of its type to borrow from


@pytest.mark.parametrize("preset", ["tiny-26b-a4b", "tiny-31b", "tiny-12b-unified"])
def test_large_families_attend_bidirectionally_over_images_with_k_eq_v_global_layers(preset: str):
    text = text_config(preset)
    assert text.layer_types == ["sliding_attention"] * 5 + ["full_attention"]  # 5:1, as 26B-A4B/31B/12B
    assert text.use_bidirectional_attention == "vision" and text.attention_k_eq_v
    assert text.sliding_window == 1024 and text.hidden_size_per_layer_input == 0
    sliding, full = text.per_layer_config[0], text.per_layer_config[len(text.layer_types) - 1]
    assert full.head_dim == 2 * sliding.head_dim  # global heads twice as wide (512 vs 256)
    assert full.num_key_value_heads < sliding.num_key_value_heads < text.num_attention_heads  # 31B: 4 < 16 < 32


def test_moe_family_routes_several_experts_beside_a_shared_expert():
    text = text_config("tiny-26b-a4b")
    assert text.enable_moe_block and text.top_k_experts > 1 and text.num_experts > text.top_k_experts
    assert text.moe_intermediate_size < text.intermediate_size < text.hidden_size  # 704 < 2,112 < 2,816


def test_unified_family_has_no_vision_tower_and_declares_its_image_bound():
    directory = ensure_checkpoint("tiny-12b-unified")
    raw = json.loads((directory / "config.json").read_text())
    assert raw["vision_config"]["num_soft_tokens"] == PRESETS["tiny-12b-unified"].soft_tokens  # vLLM reads it
    assert raw["vision_config"]["model_type"] == "gemma4_unified_vision"
    generation = json.loads((directory / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert sorted(generation["suppress_tokens"]) == sorted(tokenizer.convert_tokens_to_ids(["<audio|>", "<image|>"]))


@pytest.mark.parametrize("preset", FAMILIES)
def test_generation_config_is_googles(preset: str):
    directory = ensure_checkpoint(preset)
    generation = json.loads((directory / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(["<eos>", "<turn|>", "<|tool_response>"])
    assert (generation["temperature"], generation["top_k"], generation["top_p"]) == (1.0, 64, 0.95)


def test_chat_template_renders_system_then_image_then_task(processor):
    prompt = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt == "<bos><|turn>system\nSYSTEM-PROMPT<turn|>\n<|turn>user\n<|image|>TASK-TEXT<turn|>\n<|turn>model\n"


def test_chat_template_thinking_is_opt_in(processor):
    prompt = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert prompt.startswith("<bos><|turn>system\n<|think|>\nSYSTEM-PROMPT<turn|>\n")


def test_chat_template_without_generation_prompt_ends_after_the_last_turn(processor):
    prompt = processor.apply_chat_template(MESSAGES, tokenize=False)
    assert prompt.endswith("TASK-TEXT<turn|>\n")


@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-12b-unified"])  # both processors
def test_processor_expands_one_image_to_the_configured_soft_tokens(preset):
    processor = AutoProcessor.from_pretrained(ensure_checkpoint(preset))
    # 480 x 336 px = 10 x 7 units of patch 16 x pooling 3: exactly the 70-token budget.
    prompt = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = list(processor(text=[prompt], images=[Image.new("RGB", (480, 336))])["input_ids"][0])
    image_id, boi_id, eoi_id = processor.tokenizer.convert_tokens_to_ids(["<|image|>", "<|image>", "<image|>"])
    assert ids.count(image_id) == PRESETS[preset].soft_tokens == 70
    first = ids.index(image_id)
    assert ids[first - 1] == boi_id
    assert ids[first + 70] == eoi_id


def test_processor_honours_a_larger_per_request_budget(processor):
    prompt = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", (640, 480))
    default = processor(text=[prompt], images=[image])["input_ids"][0].count(processor.image_token_id)
    larger = processor(text=[prompt], images=[image], max_soft_tokens=280)["input_ids"][0].count(processor.image_token_id)
    assert default <= 70 < larger <= 280


def random_text(seed: int, length: int = 200) -> str:
    """Arbitrary unicode (any plane, no surrogates, control characters included)."""
    rng = random.Random(seed)
    chars = []
    while len(chars) < length:
        code_point = rng.choice([rng.randrange(0x80), rng.randrange(0x800), rng.randrange(0x110000)])
        if not 0xD800 <= code_point <= 0xDFFF:
            chars.append(chr(code_point))
    return "".join(chars)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Describe the image.",
        json.dumps([{"box_2d": [12, 40, 980, 1000], "label": "cat \"tabby\"\n"}]),
        json.dumps({"text": "naïve café – 東京 🚀", "escaped": "\u0000\t\\"}, ensure_ascii=False),
        "  leading and trailing spaces  \n\n\t",
        "<|image|> and <turn|> written out as text",
        *(random_text(seed) for seed in range(5)),
    ],
)
def test_tokenizer_round_trips_any_text(checkpoint: Path, text: str):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids


def test_ensure_checkpoint_builds_once_then_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    builds = []
    real_build = tiny_checkpoint.build_checkpoint
    monkeypatch.setattr(tiny_checkpoint, "build_checkpoint", lambda *args: builds.append(args) or real_build(*args))
    monkeypatch.setenv("VISION_BATCH_CACHE", str(tmp_path))

    first = ensure_checkpoint()
    second = ensure_checkpoint()

    assert first == second == tmp_path / "models" / f"{DEFAULT_PRESET}-{BUILDER_VERSION}"
    assert len(builds) == 1
    assert sorted(p.name for p in first.iterdir()) == sorted(EXPECTED_FILES)
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging directory left behind


def test_ensure_checkpoint_rebuilds_an_incomplete_cache_entry(tmp_path: Path):
    directory = ensure_checkpoint("tiny-31b", cache_dir=tmp_path)
    (directory / "model.safetensors").unlink()
    assert ensure_checkpoint("tiny-31b", cache_dir=tmp_path) == directory
    assert (directory / "model.safetensors").is_file()


def test_unknown_preset_is_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="tiny-e2b"):
        ensure_checkpoint("huge", cache_dir=tmp_path)
