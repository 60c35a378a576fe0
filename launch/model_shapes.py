"""Model shapes for capacity planning: parameter counts, FLOPs and bytes from a config's numbers.

Only what the planner's arithmetic needs. Counted: every matmul weight
(attention, MLPs, experts, router, the tied embedding as LM head), the
vision tower's transformer blocks, and the 12B's patch projection (it has
no vision tower); not counted: norms, biases, position embeddings (well
under 1% here). The shapes reproduce the published totals (26B-A4B: 25.2 B
parameters, 3.8 B active, vision ~0.55 B; 12B: ~12 B; 31B: ~31 B), which
tests check.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional


@dataclasses.dataclass(frozen=True)
class AttentionGroup:
    """Decoder layers that share one attention layout."""

    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    window: Optional[int]  # sliding-window length; None: attends to the whole context
    k_eq_v: bool = False  # values reuse the key projection (no v_proj weights)

    def attention_params(self, hidden: int) -> int:
        """Per layer: q, k, (v,) o projections."""
        kv_projections = 1 if self.k_eq_v else 2
        return hidden * self.head_dim * (2 * self.query_heads + kv_projections * self.kv_heads)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Per layer. K and V both cached (an upper bound where k_eq_v lets an engine cache one)."""
        return 2 * self.kv_heads * self.head_dim * dtype_bytes

    def context(self, tokens: float) -> float:
        """Tokens a query attends to at `tokens` of context."""
        return min(tokens, self.window) if self.window else tokens


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    vocab: int
    attention: tuple[AttentionGroup, ...]
    dense_mlp: int  # width of the always-on gated MLP of every layer
    experts: int  # routed experts per layer (0: dense model)
    experts_per_token: int
    expert_mlp: int  # width of each expert's gated MLP
    vision_hidden: int
    vision_mlp: int
    vision_layers: int  # 0: encoder-free (the 12B projects each soft token's pixels straight into the text stream)
    vision_pooling: int  # patches per soft token along each axis (pooling kernel)
    vision_embed_params: int = 0  # encoder-free: the per-soft-token pixel projection (counted in vision_params)

    @property
    def layers(self) -> int:
        return sum(group.layers for group in self.attention)

    @property
    def embedding_params(self) -> int:
        """Tied input embedding and LM head."""
        return self.vocab * self.hidden

    @property
    def expert_params(self) -> int:
        """One expert (gated MLP: gate, up, down)."""
        return 3 * self.hidden * self.expert_mlp

    @property
    def shared_linear_params(self) -> int:
        """Matmul weights every token uses in every layer: attention, dense MLP, router."""
        per_layer_mlp = 3 * self.hidden * self.dense_mlp + self.hidden * self.experts
        return sum(g.layers * g.attention_params(self.hidden) for g in self.attention) + self.layers * per_layer_mlp

    @property
    def all_expert_params(self) -> int:
        return self.layers * self.experts * self.expert_params

    @property
    def total_params(self) -> int:
        """Language model (the published "total" excludes the vision tower)."""
        return self.shared_linear_params + self.all_expert_params + self.embedding_params

    @property
    def active_linear_params(self) -> int:
        """Matmul weights one token passes through, without the LM head."""
        return self.shared_linear_params + self.layers * self.experts_per_token * self.expert_params

    @property
    def active_params(self) -> int:
        return self.active_linear_params + self.embedding_params

    @property
    def vision_block_params(self) -> int:
        """Vision transformer blocks: q, k, v, o and a gated MLP per layer."""
        return self.vision_layers * (4 * self.vision_hidden**2 + 3 * self.vision_hidden * self.vision_mlp)

    @property
    def vision_params(self) -> int:
        return self.vision_block_params + self.vision_embed_params

    def attention_flops_per_token(self, context: float) -> float:
        """Score and value matmuls (QK^T, AV) of one token attending to `context` tokens, all layers."""
        return sum(4 * g.layers * g.query_heads * g.head_dim * g.context(context) for g in self.attention)

    def kv_bytes_read(self, context: float, dtype_bytes: int) -> float:
        """KV cache one decode step of one sequence reads at `context` tokens."""
        return sum(g.layers * g.kv_bytes_per_token(dtype_bytes) * g.context(context) for g in self.attention)

    def experts_touched(self, batch: int) -> float:
        """Expected distinct experts per layer that `batch` tokens route to (uniform routing)."""
        if not self.experts:
            return 0.0
        return self.experts * (1 - (1 - self.experts_per_token / self.experts) ** batch)

    def vision_flops(self, soft_tokens: int) -> float:
        """Vision over one image: the tower on `soft_tokens` x pooling^2 patches (full attention among them),
        plus the encoder-free projection of each soft token's pixels."""
        patches = soft_tokens * self.vision_pooling**2
        per_patch = 2 * self.vision_block_params + 4 * self.vision_layers * self.vision_hidden * patches
        return patches * per_patch + soft_tokens * 2 * self.vision_embed_params


# google/gemma-4-26B-A4B-it config.json (text_config / vision_config): 30 layers in a 5 sliding : 1 full
# pattern, sliding window 1,024; global layers use 512-wide heads, 2 KV heads and attention_k_eq_v.
GEMMA4_26B_A4B = ModelShape(
    name="gemma-4-26B-A4B",
    hidden=2816,
    vocab=262144,
    attention=(
        AttentionGroup(layers=25, query_heads=16, kv_heads=8, head_dim=256, window=1024),
        AttentionGroup(layers=5, query_heads=16, kv_heads=2, head_dim=512, window=None, k_eq_v=True),
    ),
    dense_mlp=2112,
    experts=128,
    experts_per_token=8,
    expert_mlp=704,
    vision_hidden=1152,
    vision_mlp=4304,
    vision_layers=27,
    vision_pooling=3,
)

# google/gemma-4-12B-it config.json (Gemma4UnifiedForConditionalGeneration), as transcribed in SGLang's unit test
# of its Gemma4Unified config class ("Authoritative subset of google/gemma-4-12B-it config.json"): 48 layers, every 6th full attention (8), sliding window 1,024; sliding layers 16 query / 8 KV
# heads of 256, global layers 512-wide heads, 1 KV head and attention_k_eq_v; dense MLP 15,360; no experts.
# Encoder-free vision: each soft token is a 48 x 48 pixel patch (patch 16 x pooling 3) projected to 3,840.
GEMMA4_12B = ModelShape(
    name="gemma-4-12B",
    hidden=3840,
    vocab=262144,
    attention=(
        AttentionGroup(layers=40, query_heads=16, kv_heads=8, head_dim=256, window=1024),
        AttentionGroup(layers=8, query_heads=16, kv_heads=1, head_dim=512, window=None, k_eq_v=True),
    ),
    dense_mlp=15360,
    experts=0,
    experts_per_token=0,
    expert_mlp=0,
    vision_hidden=0,
    vision_mlp=0,
    vision_layers=0,
    vision_pooling=1,  # one 48 x 48 patch per soft token
    vision_embed_params=48 * 48 * 3 * 3840,
)

# google/gemma-4-31B-it config.json as other runtimes transcribe it (hidden 5,376, MLP 21,504, 60 layers in the
# 5 sliding : 1 full pattern; sliding 32 query / 16 KV heads of 256, global 512-wide heads with 4 KV heads). Not
# read from the checkpoint here: attention_k_eq_v on the global layers is assumed as in 26B-A4B and the 12B
# (without it: +0.1 B). Vision tower as 26B-A4B's.
GEMMA4_31B = ModelShape(
    name="gemma-4-31B",
    hidden=5376,
    vocab=262144,
    attention=(
        AttentionGroup(layers=50, query_heads=32, kv_heads=16, head_dim=256, window=1024),
        AttentionGroup(layers=10, query_heads=32, kv_heads=4, head_dim=512, window=None, k_eq_v=True),
    ),
    dense_mlp=21504,
    experts=0,
    experts_per_token=0,
    expert_mlp=0,
    vision_hidden=1152,
    vision_mlp=4304,
    vision_layers=27,
    vision_pooling=3,
)

SHAPES: Mapping[str, ModelShape] = {shape.name: shape for shape in (GEMMA4_12B, GEMMA4_26B_A4B, GEMMA4_31B)}
