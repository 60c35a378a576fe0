"""The offline tiny Gemma 4 checkpoint: deterministic, loadable by transformers, cached.

No engine here: vLLM loading is covered by the engine tests.
"""
import hashlib
import json
import random
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from pipelines import tiny_checkpoint
from pipelines.tiny_checkpoint import BUILDER_VERSION, EXPECTED_FILES, PRESETS, build_checkpoint, ensure_checkpoint

MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "SYSTEM-PROMPT"}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "TASK-TEXT"}]},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-dense"))


@pytest.fixture(scope="module")
def processor(checkpoint: Path):
    return AutoProcessor.from_pretrained(checkpoint)


def file_hashes(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_two_builds_are_byte_identical(tmp_path: Path, preset: str):
    first = file_hashes(build_checkpoint(tmp_path / "a", preset))
    second = file_hashes(build_checkpoint(tmp_path / "b", preset))
    assert sorted(first) == sorted(EXPECTED_FILES)
    assert first == second


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_config_is_a_gemma4_vlm_whose_token_ids_match_the_tokenizer(tmp_path: Path, preset: str):
    directory = build_checkpoint(tmp_path, preset)
    config = AutoConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert config.architectures == ["Gemma4ForConditionalGeneration"]
    assert config.vision_config.default_output_length == PRESETS[preset].soft_tokens
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.text_config.num_experts == PRESETS[preset].num_experts
    for attribute, token in [
        ("image_token_id", "<|image|>"),
        ("boi_token_id", "<|image>"),
        ("eoi_token_id", "<image|>"),
        ("video_token_id", "<|video|>"),
    ]:
        assert getattr(config, attribute) == tokenizer.convert_tokens_to_ids(token)


def test_generation_stops_at_end_of_turn(checkpoint: Path):
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.convert_tokens_to_ids("<turn|>") in generation["eos_token_id"]


def test_chat_template_renders_system_then_image_then_task(processor):
    prompt = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<bos><|turn>system\nSYSTEM-PROMPT<turn|>\n<|turn>user\n")
    assert prompt.endswith("<turn|>\n<|turn>model\n")
    assert prompt.index("SYSTEM-PROMPT") < prompt.index("\n\n<|image|>\n\n") < prompt.index("TASK-TEXT")
    assert prompt.count("<|image|>") == 1
    assert "<|think|>" not in prompt


def test_chat_template_thinking_is_opt_in(processor):
    prompt = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert prompt.startswith("<bos><|turn>system\n<|think|>SYSTEM-PROMPT<turn|>\n")


def test_chat_template_without_generation_prompt_ends_after_the_last_turn(processor):
    prompt = processor.apply_chat_template(MESSAGES, tokenize=False)
    assert prompt.endswith("TASK-TEXT<turn|>\n")


def test_processor_expands_one_image_to_the_configured_soft_tokens(processor):
    # 480 x 336 px = 10 x 7 units of patch 16 x pooling 3: exactly the 70-token budget.
    prompt = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = processor(text=[prompt], images=[Image.new("RGB", (480, 336))])["input_ids"][0]
    image_id, boi_id, eoi_id = processor.tokenizer.convert_tokens_to_ids(["<|image|>", "<|image>", "<image|>"])
    assert ids.count(image_id) == PRESETS["tiny-dense"].soft_tokens == 70
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

    assert first == second == tmp_path / "models" / f"tiny-dense-{BUILDER_VERSION}"
    assert len(builds) == 1
    assert sorted(p.name for p in first.iterdir()) == sorted(EXPECTED_FILES)
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging directory left behind


def test_ensure_checkpoint_rebuilds_an_incomplete_cache_entry(tmp_path: Path):
    directory = ensure_checkpoint("tiny-dense", cache_dir=tmp_path)
    (directory / "model.safetensors").unlink()
    assert ensure_checkpoint("tiny-dense", cache_dir=tmp_path) == directory
    assert (directory / "model.safetensors").is_file()


def test_unknown_preset_is_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="tiny-dense"):
        ensure_checkpoint("huge", cache_dir=tmp_path)
