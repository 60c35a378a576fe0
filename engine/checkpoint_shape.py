"""What an engine profile needs to know about a checkpoint before the engine starts.

Read from the checkpoint's own `config.json` and the sizes of its weight
files (local or gs://, through Beam's filesystems), so a profile can refuse a
checkpoint it cannot run, with a reason, instead of failing minutes later
inside vLLM, and the `cpu` profile can size its KV pool from the model.
Pure arithmetic after the read; nothing is loaded.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

from apache_beam.io.filesystems import FileSystems

SLIDING = "sliding_attention"
# The image budget Gemma 4's unified processor uses when its processor_config.json gives none (transformers
# src/transformers/models/gemma4_unified/image_processing_gemma4_unified.py: Gemma4UnifiedImageProcessor.max_soft_tokens).
UNIFIED_PROCESSOR_SOFT_TOKENS = 280
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def dtype_bytes(dtype: Optional[str]) -> int:
    """Bytes per value of a dtype name as configs and vLLM spell it; 2 (bfloat16, Gemma 4's) when unset or "auto"."""
    return _DTYPE_BYTES.get(dtype or "bfloat16", 2)


@dataclasses.dataclass(frozen=True)
class LayerKV:
    """The KV cache one decoder layer keeps per token."""

    kv_heads: int
    head_dim: int
    sliding: bool  # sliding-window layer: keeps at most `window` tokens when the engine honours windows


@dataclasses.dataclass(frozen=True)
class CheckpointShape:
    architecture: str
    cached_layers: tuple[LayerKV, ...]  # layers with their own KV cache (KV-shared layers reuse another's)
    kv_shared_layers: int  # layers that reuse an earlier layer's KV (Gemma 4 E2B/E4B)
    sliding_window: int
    bidirectional_vision: bool  # `use_bidirectional_attention: "vision"`: image tokens attend both ways
    per_layer_embeddings: bool  # `hidden_size_per_layer_input > 0` (E2B/E4B)
    weight_bytes: int  # the weight files' size: what loading them takes in memory at their own dtype
    # Image soft tokens per image when a request sets no budget: vision_config's default_output_length
    # (vision-tower models, read by vllm gemma4_mm.py) or num_soft_tokens (the unified 12B); None if absent.
    vision_tokens: Optional[int] = None
    stored_dtype_bytes: int = 2  # bytes per weight in the files (config "dtype"; Gemma 4 ships bfloat16)
    # A unified (encoder-free, 12B) config without vision_config.num_soft_tokens: vLLM 0.32 reads that key
    # unguarded (vllm/model_executor/models/gemma4_unified.py, get_mm_max_tokens_per_item and
    # _compute_num_soft_tokens), and transformers' converter does not write it.
    lacks_num_soft_tokens: bool = False

    def weight_bytes_at(self, dtype_bytes: int) -> int:
        """What the weights take in memory once loaded at `dtype_bytes` per weight (vLLM casts on load)."""
        return self.weight_bytes * dtype_bytes // self.stored_dtype_bytes

    def kv_bytes_per_sequence(self, tokens: int, dtype_bytes: int, windowed: bool) -> int:
        """KV bytes of one sequence of `tokens` tokens.

        `windowed`: the engine keeps only the window for sliding layers (vLLM's
        hybrid KV cache manager); without it every layer keeps every token.
        """
        total = 0
        for layer in self.cached_layers:
            kept = min(tokens, self.sliding_window) if windowed and layer.sliding else tokens
            total += 2 * layer.kv_heads * layer.head_dim * dtype_bytes * kept  # K and V
        return total

    @staticmethod
    def from_config(
        config: Mapping[str, Any], weight_bytes: int, processor: Optional[Mapping[str, Any]] = None
    ) -> "CheckpointShape":
        """From a Gemma 4 `config.json` (tower or unified): per-layer head sizes and KV heads as vLLM reads them.

        Both spellings of the full-attention layers' shape are read: Google's own `config.json`
        (`global_head_dim`, `num_global_key_value_heads`) and transformers' re-serialisation
        (`per_layer_config`). `processor`: the checkpoint's `processor_config.json`, for the image
        budget its processor documents.
        """
        text = config.get("text_config", config)
        vision = config.get("vision_config") or {}
        layer_types = list(text["layer_types"])
        shared = int(text.get("num_kv_shared_layers") or 0)
        overrides = {int(index): values for index, values in (text.get("per_layer_config") or _global_layers(text)).items()}
        processor_tokens = ((processor or {}).get("image_processor") or processor or {}).get("max_soft_tokens")
        unified = "unified" in str(config.get("model_type", "")) or any(
            "Unified" in name for name in config.get("architectures") or ()
        )
        cached = tuple(
            LayerKV(
                kv_heads=int(overrides.get(index, {}).get("num_key_value_heads", text["num_key_value_heads"])),
                head_dim=int(overrides.get(index, {}).get("head_dim", text["head_dim"])),
                sliding=layer_type == SLIDING,
            )
            for index, layer_type in enumerate(layer_types[: len(layer_types) - shared])
        )
        return CheckpointShape(
            architecture=(config.get("architectures") or ["?"])[0],
            cached_layers=cached,
            kv_shared_layers=shared,
            sliding_window=int(text.get("sliding_window") or 0),
            bidirectional_vision=text.get("use_bidirectional_attention") == "vision",
            per_layer_embeddings=int(text.get("hidden_size_per_layer_input") or 0) > 0,
            weight_bytes=weight_bytes,
            vision_tokens=vision.get("default_output_length") or vision.get("num_soft_tokens") or processor_tokens
            or (UNIFIED_PROCESSOR_SOFT_TOKENS if unified else None),
            stored_dtype_bytes=dtype_bytes(config.get("dtype") or config.get("torch_dtype")),
            lacks_num_soft_tokens=unified and not vision.get("num_soft_tokens"),
        )

    @staticmethod
    def read(model_path: str) -> "CheckpointShape":
        """The shape of the checkpoint at `model_path` (local directory or gs:// prefix)."""
        root = model_path.rstrip("/")
        with FileSystems.open(f"{root}/config.json") as handle:
            config = json.loads(handle.read())
        processor = None
        if FileSystems.exists(f"{root}/processor_config.json"):
            with FileSystems.open(f"{root}/processor_config.json") as handle:
                processor = json.loads(handle.read())
        [matched] = FileSystems.match([f"{root}/*.safetensors"])
        return CheckpointShape.from_config(config, sum(meta.size_in_bytes for meta in matched.metadata_list), processor)


def _global_layers(text: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """The full-attention layers' head size and KV heads from Google's raw keys, as transformers derives them.

    transformers src/transformers/models/gemma4/configuration_gemma4.py (and gemma4_unified's),
    Gemma4TextConfig.__post_init__: without `per_layer_config`, every `full_attention` layer gets
    `head_dim = global_head_dim` (default 512) and, when `attention_k_eq_v`, `num_key_value_heads =
    num_global_key_value_heads` (when given).
    """
    layer: dict[str, Any] = {"head_dim": text.get("global_head_dim", 512)}
    if text.get("attention_k_eq_v", False) and text.get("num_global_key_value_heads") is not None:
        layer["num_key_value_heads"] = text["num_global_key_value_heads"]
    return {index: layer for index, kind in enumerate(text["layer_types"]) if kind == "full_attention"}

