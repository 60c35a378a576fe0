"""Build a tiny random-weight Gemma 4 vision-language checkpoint, offline.

Why this exists
    There is no model hub here (no network beyond package registries), yet the
    pipeline, its tests and its benchmarks need a real Gemma 4 checkpoint to load.
    This module writes one from scratch in seconds: a genuine ``Gemma4Config``,
    weights from transformers' own ``Gemma4ForConditionalGeneration`` (so tensor
    names are exactly those of Google's checkpoints), a byte-level BPE tokenizer
    holding Gemma 4's special tokens by their real names, a Gemma-4-style chat
    template and the processor configs. vLLM and transformers load it through
    exactly the code path they use for a real checkpoint, so the pipeline needs
    no special case for tests. The weights are random: outputs are noise, which
    is why tests assert structure (valid JSON, counts, cache hits), never text.

What it does not exercise
    Google's real tokenizer (262k SentencePiece vocabulary) and its full chat
    template (tool calling, thought stripping of history), per-layer embeddings
    (the E2B/E4B variants), bidirectional vision attention, the audio tower, and
    TPU kernels. Anything depending on those needs the real model.

Builds are deterministic (fixed seeds, sorted JSON, no timestamps): the same
preset gives byte-identical files, so a build is keyed by preset and
``BUILDER_VERSION`` alone and cached by :func:`ensure_checkpoint`.

Command line::

    python -m pipelines.tiny_checkpoint [--preset tiny-dense|tiny-moe|bench] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma4AudioFeatureExtractor,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessorPil,
    Gemma4Processor,
    Gemma4VideoProcessor,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

# Bump whenever the bytes a build writes change: it names the cache entry, so
# old cached builds are never mistaken for new ones.
BUILDER_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class Preset:
    """Shape of one generated checkpoint (settings common to all presets are in ``_model_config``)."""

    hidden_size: int  # text width: tiny keeps builds and tests fast, bench makes compute dominate
    intermediate_size: int  # dense MLP width (4x hidden, the usual ratio)
    num_attention_heads: int  # query heads of the text decoder
    num_key_value_heads: int  # fewer KV than query heads, so grouped-query attention is exercised
    head_dim: int  # sliding-window layers' head size (a multiple of 32: vLLM's CPU attention needs it)
    global_head_dim: int  # full-attention head size, larger as in Gemma 4 (vLLM then caches prefixes in 64-token steps)
    layer_types: tuple[str, ...]  # sliding/full mix; Gemma 4 requires the last layer to be full
    vision_hidden_size: int  # vision tower width
    vision_num_layers: int  # vision encoder depth
    vision_num_heads: int  # vision attention heads
    vision_head_dim: int  # vision head size (heads x head size = vision width)
    soft_tokens: int  # default image budget (70/140/280/560/1120 are the only legal values)
    num_experts: int | None = None  # MoE experts per layer; None builds a dense model
    top_k_experts: int | None = None  # experts routed per token in MoE layers
    moe_intermediate_size: int | None = None  # width of each expert's MLP


_TINY_DENSE = Preset(
    hidden_size=64,  # smallest width that keeps two 32-wide heads
    intermediate_size=256,  # 4x hidden
    num_attention_heads=2,  # two query heads ...
    num_key_value_heads=1,  # ... sharing one KV head (GQA)
    head_dim=32,  # smallest head size vLLM's CPU attention accepts
    global_head_dim=64,  # differs from head_dim, as in real Gemma 4
    layer_types=("sliding_attention", "full_attention"),  # one of each kind
    vision_hidden_size=32,  # the tower only has to run, not see
    vision_num_layers=1,  # one encoder layer is enough to exercise it
    vision_num_heads=2,  # multi-head vision attention
    vision_head_dim=16,  # 2 x 16 = vision_hidden_size
    soft_tokens=70,  # Gemma 4's smallest budget: short prompts, fast tests
)

PRESETS: dict[str, Preset] = {
    # Smallest model that still has every Gemma 4 part: ~0.27 M params, a 1.1 MB checkpoint.
    "tiny-dense": _TINY_DENSE,
    # The tiny model with mixture-of-experts layers (~0.47 M params), so vLLM's MoE path runs.
    "tiny-moe": dataclasses.replace(
        _TINY_DENSE,
        num_experts=4,  # a few experts ...
        top_k_experts=2,  # ... of which more than one is routed, like Gemma 4 26B-A4B
        moe_intermediate_size=128,  # experts narrower than the dense MLP, as in the real MoE
    ),
    # Big enough (~138 M params, 550 MB in fp32) that engine compute dominates benchmarks.
    "bench": Preset(
        hidden_size=1024,  # ~133 M text params with 8 layers
        intermediate_size=4096,  # 4x hidden
        num_attention_heads=8,
        num_key_value_heads=4,  # GQA as in real Gemma 4
        head_dim=128,
        global_head_dim=256,  # larger global heads, as in real Gemma 4
        layer_types=(("sliding_attention",) * 3 + ("full_attention",)) * 2,  # mostly sliding, full last
        vision_hidden_size=256,  # a tower with real cost per image, still well below the LM's
        vision_num_layers=4,
        vision_num_heads=4,
        vision_head_dim=64,
        soft_tokens=280,  # Gemma 4's default budget, so image/text proportions are realistic
    ),
}

# Gemma 4's special tokens by their real names, in an order that gives pad/eos/bos
# the real ids 0/1/2. tokenizer_config.json attribute -> token, as Google ships it.
_CORE_SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}
_MODEL_SPECIAL_TOKENS = {
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "escape_token": '<|"|>',
}
_VIDEO_TOKEN = "<|video|>"  # not a named attribute in Google's tokenizer either

# Fixed BPE training text. Byte-level BPE encodes any string whatever it was
# trained on; these lines only give common prompt/JSON fragments a few merges.
_TOKENIZER_CORPUS = (
    "Describe the image in one sentence.",
    "Read all the text in the image (OCR).",
    "Detect every object. Return JSON: [{\"box_2d\": [ymin, xmin, ymax, xmax], \"label\": \"cat\"}]",
    '{"caption": "a red car on a street", "objects": [], "text": ""}',
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "system user model",
)
_TOKENIZER_VOCAB_SIZE = 512  # an upper bound: this corpus stops at ~430 tokens

# Gemma-4-style chat template: the turn, image and thinking markup of Google's
# template (images become "\n\n<|image|>\n\n", which vLLM's Gemma 4 processor
# expands to <|image> + N x <|image|> + <image|>), without tool calling.
CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content | trim -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if item['type'] == 'text' -%}
                {{- item['text'] | trim -}}
            {%- elif item['type'] == 'image' -%}
                {{- '\\n\\n<|image|>\\n\\n' -}}
            {%- elif item['type'] == 'video' -%}
                {{- '\\n\\n<|video|>\\n\\n' -}}
            {%- elif item['type'] == 'audio' -%}
                {{- '<|audio|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set loop_messages = messages -%}
{%- if thinking or messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\\n' -}}
    {%- if thinking -%}
        {{- '<|think|>' -}}
    {%- endif -%}
    {%- if messages[0]['role'] in ['system', 'developer'] -%}
        {{- render_content(messages[0]['content']) -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\\n' -}}
    {{- render_content(message['content']) -}}
    {{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\\n' -}}
{%- endif -%}
"""

# Every file a complete build holds; ensure_checkpoint checks them.
EXPECTED_FILES = (
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)

_SEED = 0
# Gemma 4's patch and pooling sizes, so image token counts match the real model's.
_PATCH_SIZE = 16
_POOLING_KERNEL_SIZE = 3


def build_checkpoint(out_dir: str | os.PathLike[str], preset: str = "tiny-dense") -> Path:
    """Write a complete Hugging Face checkpoint for ``preset`` into ``out_dir``.

    The directory is created if needed; existing files of the same names are
    overwritten. Returns the directory.
    """
    spec = _preset(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    config = _model_config(spec, tokenizer)
    _save_model(config, _generation_config(tokenizer), out)
    _processor(spec, tokenizer).save_pretrained(out)
    _make_readable(out)
    log.info("built %s checkpoint in %s", preset, out)
    return out


def ensure_checkpoint(preset: str = "tiny-dense", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a cached build of ``preset``, building it first if it is absent.

    The cache lives under ``cache_dir`` (default ``$VISION_BATCH_CACHE``, else
    ``~/.cache/vision-batch``) at ``models/<preset>-<BUILDER_VERSION>``. A build
    goes into a temporary sibling directory that is renamed into place, so
    readers never see a partial checkpoint and concurrent callers are safe:
    the first rename wins and the others discard their copies.
    """
    _preset(preset)
    target = _cache_root(cache_dir) / "models" / f"{preset}-{BUILDER_VERSION}"
    if not _missing_files(target):
        return target
    if target.exists():
        log.warning("cached checkpoint %s is incomplete; rebuilding it", target)
        _discard(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _build_into_place(preset, target)
    missing = _missing_files(target)
    if missing:
        raise RuntimeError(f"checkpoint {target} is incomplete, missing: {', '.join(missing)}")
    return target


def _preset(name: str) -> Preset:
    """Look up a preset, naming the valid ones when the name is unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def _train_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer holding Gemma 4's special tokens.

    Byte level, so every string (JSON, any unicode) is encodable and decodes
    back unchanged; no post-processor adds BOS because the chat template
    writes ``<bos>`` itself, as with Google's tokenizer.
    """
    special = [*_CORE_SPECIAL_TOKENS.values(), *_MODEL_SPECIAL_TOKENS.values(), _VIDEO_TOKEN]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **_CORE_SPECIAL_TOKENS,
        extra_special_tokens=_MODEL_SPECIAL_TOKENS,
        additional_special_tokens=[_VIDEO_TOKEN],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """Id of a token that must be in the vocabulary as a single token."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise RuntimeError(f"token {token!r} is missing from the vocabulary")
    return token_id


def _model_config(spec: Preset, tokenizer: PreTrainedTokenizerFast) -> Gemma4Config:
    """A real ``Gemma4Config`` (text + vision, no audio) with this tokenizer's ids."""
    vocab_size = len(tokenizer)
    text = {
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": len(spec.layer_types),
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "global_head_dim": spec.global_head_dim,
        "layer_types": list(spec.layer_types),
        "sliding_window": 512,  # Gemma 4's smaller window
        "final_logit_softcapping": 30.0,  # as in Google's configs
        "hidden_size_per_layer_input": 0,  # no per-layer embeddings (only E2B/E4B have them)
        "vocab_size_per_layer_input": vocab_size,
        "enable_moe_block": spec.num_experts is not None,
        "num_experts": spec.num_experts,
        "top_k_experts": spec.top_k_experts,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": 4 * spec.vision_hidden_size,
        "num_hidden_layers": spec.vision_num_layers,
        "num_attention_heads": spec.vision_num_heads,
        "num_key_value_heads": spec.vision_num_heads,
        "head_dim": spec.vision_head_dim,
        "patch_size": _PATCH_SIZE,
        "pooling_kernel_size": _POOLING_KERNEL_SIZE,
        "position_embedding_size": 1024,  # patch positions per axis; ample for a 1120-token budget
        "default_output_length": spec.soft_tokens,  # vLLM reads it as the per-image token bound
    }
    return Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        boi_token_id=_token_id(tokenizer, _MODEL_SPECIAL_TOKENS["boi_token"]),
        eoi_token_id=_token_id(tokenizer, _MODEL_SPECIAL_TOKENS["eoi_token"]),
        image_token_id=_token_id(tokenizer, _MODEL_SPECIAL_TOKENS["image_token"]),
        video_token_id=_token_id(tokenizer, _VIDEO_TOKEN),
        boa_token_id=_token_id(tokenizer, _MODEL_SPECIAL_TOKENS["boa_token"]),
        eoa_token_index=_token_id(tokenizer, _MODEL_SPECIAL_TOKENS["eoa_token"]),
        audio_token_id=_token_id(tokenizer, _MODEL_SPECIAL_TOKENS["audio_token"]),
        architectures=["Gemma4ForConditionalGeneration"],
        dtype="float32",  # full-precision weights; vLLM's dtype="auto" still runs them in bf16 on CPU
    )


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Google's generation defaults: stop at ``<eos>`` or end of turn, sample top-k/top-p."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, _token_id(tokenizer, _MODEL_SPECIAL_TOKENS["eot_token"])],
        do_sample=True,
        temperature=1.0,
        top_k=64,
        top_p=0.95,
    )


def _save_model(config: Gemma4Config, generation: GenerationConfig, out: Path) -> None:
    """Initialise the model from a fixed seed and save config, generation config and weights.

    The seed is applied on a forked RNG so building does not disturb the
    caller's random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = Gemma4ForConditionalGeneration(config)
    model.generation_config = generation
    model.save_pretrained(out)


def _processor(spec: Preset, tokenizer: PreTrainedTokenizerFast) -> Gemma4Processor:
    """The Gemma 4 processor (image, video, audio front ends) for this tokenizer.

    Gemma 4's processor refuses to start without its audio feature extractor,
    so it is saved even though the model has no audio tower.
    """
    image_processor = Gemma4ImageProcessorPil(
        max_soft_tokens=spec.soft_tokens, patch_size=_PATCH_SIZE, pooling_kernel_size=_POOLING_KERNEL_SIZE
    )
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=spec.soft_tokens,
    )


def _make_readable(checkpoint: Path) -> None:
    """Make the checkpoint's files world-readable (644).

    transformers writes the weights as 600; a shared cache must be readable by
    other accounts (e.g. pipeline workers running as another user).
    """
    for name in EXPECTED_FILES:
        (checkpoint / name).chmod(0o644)


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache root: the argument, else ``$VISION_BATCH_CACHE``, else ``~/.cache/vision-batch``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("VISION_BATCH_CACHE") or Path.home() / ".cache" / "vision-batch")


def _missing_files(checkpoint: Path) -> list[str]:
    """Names from ``EXPECTED_FILES`` that ``checkpoint`` lacks (all of them if it does not exist)."""
    return [name for name in EXPECTED_FILES if not (checkpoint / name).is_file()]


def _build_into_place(preset: str, target: Path) -> None:
    """Build into a temporary sibling of ``target``, then rename it to ``target``.

    The rename is atomic; if another process renamed its build first, ours
    is discarded and theirs is used.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it 700; the cache is shared
    try:
        build_checkpoint(staging, preset)
        os.rename(staging, target)
    except OSError:
        if _missing_files(target):
            raise
        log.info("another process built %s first; using its copy", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _discard(path: Path) -> None:
    """Remove a broken cache entry: rename it aside first so the name frees atomically."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.trash.", dir=path.parent))
    try:
        os.rename(path, trash / path.name)
    except FileNotFoundError:
        pass  # another process removed it already
    shutil.rmtree(trash, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Command line: build (or reuse) a checkpoint and print its directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny-dense")
    parser.add_argument("--out", type=Path, help="build into this directory (default: the shared cache)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = build_checkpoint(args.out, args.preset) if args.out else ensure_checkpoint(args.preset)
    print(path)


if __name__ == "__main__":
    main()
