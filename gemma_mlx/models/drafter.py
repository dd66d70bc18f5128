"""The MTP "assistant" drafter of Gemma 4 12B: four query-only layers that read the target's K/V.

One draft step (HF `Gemma4UnifiedAssistantForCausalLM`): `pre_projection([target embedding of the
last token * sqrt(hidden), target hidden])` -> layers whose attention projects only queries and
attends to the target's cached keys/values of its last sliding / last full layer -> norm -> tied
head (greedy draft) and `post_projection` (the next step's hidden state).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache, RingKVCache
from ..config import DrafterConfig, LayerSpec, TextConfig
from .gemma import MLP, RMSNorm


class QueryAttention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.heads, self.scale, self.rope = cfg.num_attention_heads, cfg.query_scale, spec.rope
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * spec.head_dim, bias=False)
        self.q_norm = RMSNorm(spec.head_dim, cfg.rms_norm_eps, cfg.norm_offset)
        self.o_proj = nn.Linear(cfg.num_attention_heads * spec.head_dim, cfg.hidden_size, bias=False)
        self._freqs = None if spec.rope.freqs is None else mx.array(spec.rope.freqs, dtype=mx.float32)

    def __call__(
        self, x: mx.array, kv: tuple[mx.array, mx.array, mx.array | None], position: int
    ) -> mx.array:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.heads, -1)).transpose(0, 2, 1, 3)
        r = self.rope
        q = mx.fast.rope(
            q, r.dims, traditional=False, base=r.base, scale=r.scale, offset=position, freqs=self._freqs
        )
        k, v, mask = kv
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class DrafterLayer(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        dim, eps, off = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset
        self.self_attn = QueryAttention(cfg, spec)
        self.mlp = MLP(dim, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(dim, eps, off)
        self.post_attention_layernorm = RMSNorm(dim, eps, off)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps, off)
        self.post_feedforward_layernorm = RMSNorm(dim, eps, off)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x: mx.array, kv, position: int) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), kv, position))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


class DrafterModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # used only as the tied head
        self.layers = [DrafterLayer(cfg, spec) for spec in cfg.layers]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


def shared_kv(cache: list[KVCache | RingKVCache], layer_types: tuple[str, ...], position: int) -> dict:
    """K/V of the target's last sliding and last full layer as the drafter sees them from
    `position`: every cached key, the sliding ones limited to the window (masks from positions,
    so a ring that wrapped or was rolled back is read correctly)."""
    out = {}
    for kind in set(layer_types):
        c = cache[len(layer_types) - 1 - layer_types[::-1].index(kind)]
        if isinstance(c, RingKVCache):
            stored = min(c.offset, c.capacity)
            kpos = c._slot_positions(c.offset - 1)[:stored]
            # HF's assistant mask: keys within `window` of the newest cached key (|distance| <= window)
            mask = (kpos >= 0) & (kpos >= position - 1 - c.window)
            out[kind] = (c.keys[..., :stored, :], c.values[..., :stored, :], mask)
        else:
            out[kind] = (c.keys[..., : c.offset, :], c.values[..., : c.offset, :], None)
    return out


class Drafter(nn.Module):
    """Parameter names follow the assistant checkpoint (`model.layers...`, `pre_projection`)."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        text = config.text
        self.model = DrafterModel(text)
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, config.backbone_hidden_size, bias=False)

    def __call__(
        self, embedding: mx.array, hidden: mx.array, kv: dict, position: int
    ) -> tuple[mx.array, mx.array]:
        """`embedding`, `hidden` `[B, 1, backbone]` (target's scaled embedding of the last token and
        its final-norm hidden state) -> (logits `[B, 1, vocab]`, next hidden `[B, 1, backbone]`)."""
        x = self.pre_projection(mx.concatenate([embedding, hidden], axis=-1))
        types = self.config.text.layer_types
        for layer, kind in zip(self.model.layers, types, strict=True):
            x = layer(x, kv[kind], position)
        x = self.model.norm(x)
        return self.model.embed_tokens.as_linear(x), self.post_projection(x)


def load_drafter(path) -> Drafter:
    """Load a `gemma4_unified_assistant` checkpoint (float or converted)."""
    import json
    from pathlib import Path

    from ..checkpoint import CheckpointError, quantize_skeleton, read_weights
    from ..config import parse_drafter_config

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    drafter = Drafter(parse_drafter_config(raw, str(path / "config.json")))
    weights = {k: v for k, v in read_weights(path).items() if not k.startswith("lm_head.")}
    if raw.get("quantization"):
        quantize_skeleton(drafter, raw["quantization"], weights)
    try:
        drafter.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: drafter weights do not match config.json ({e})") from None
    mx.eval(drafter.parameters())
    return drafter
