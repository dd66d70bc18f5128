"""The Gemma text backbone (Gemma 4 12B and Gemma 3 by configuration) and the unified 12B model.

Shapes: `B` batch, `L` new tokens, `H` heads, `D` head dim, `K` keys attended.
Reference: transformers `gemma4_unified/modeling_gemma4_unified.py` (and `gemma3`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import KV, Cache, KVBits, KVCache, Mask, QuantizedKV, RingKVCache, SharedView, attention_mask
from ..config import SLIDING, LayerSpec, ModelConfig, TextConfig
from .rope import RoPE


class RMSNorm(nn.Module):
    """RMSNorm; `offset` 1.0 gives Gemma 3's `(1 + w)`, 0.0 Gemma 4's plain `w`."""

    def __init__(self, dims: int, eps: float, offset: float = 0.0, scale: bool = True):
        super().__init__()
        if scale:
            self.weight = mx.ones((dims,)) if offset == 0 else mx.zeros((dims,))
        self.eps, self.offset = eps, offset

    def __call__(self, x: mx.array) -> mx.array:
        w = self.get("weight")
        if w is not None and self.offset:
            # as HF: `1 + w` in float32, the result back in the input's dtype (a float32 weight
            # would otherwise turn the whole residual stream of a bf16 model into float32)
            return mx.fast.rms_norm(x, w.astype(mx.float32) + self.offset, self.eps).astype(x.dtype)
        return mx.fast.rms_norm(x, w, self.eps)


def attend(q: mx.array, k: KV, v: KV, scale: float, mask: Mask) -> mx.array:
    """Scaled dot-product attention of `q [B, H, L, D]` over `K` keys; keys/values quantized by
    the cache are read with `mx.quantized_matmul` (no float copy), grouped-query heads folded."""
    if not isinstance(k, QuantizedKV):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    B, H, L, D = q.shape
    kv_heads, K = k.packed.shape[1], k.packed.shape[2]
    q = (q * scale).reshape(B, kv_heads, H // kv_heads, L, D)

    def matmul(x: mx.array, t: QuantizedKV, transpose: bool) -> mx.array:
        w, s, b = (a[:, :, None] for a in t[:3])  # broadcast over the query heads of a group
        return mx.quantized_matmul(x, w, s, b, transpose=transpose, group_size=t.group_size, bits=t.bits)

    scores = matmul(q, k, True)  # [B, kv_heads, H / kv_heads, L, K]
    if isinstance(mask, str):  # "causal": the queries are the last L of the K positions
        mask = mx.arange(K)[None] <= mx.arange(K - L, K)[:, None]
    if mask is not None:
        mask = mask[:, :, None] if mask.ndim == 4 else mask  # [B, 1, L, K] -> per kv head group
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    probs = mx.softmax(scores, axis=-1, precise=True)
    return matmul(probs, v, False).reshape(B, H, L, D)


class Attention(nn.Module):
    """Self-attention of one layer. `query_only` (the MTP drafter) projects only queries and
    attends to keys/values handed in by the caller (the target's, via `Cache.shared_view`)."""

    def __init__(self, cfg: TextConfig, spec: LayerSpec, query_only: bool = False):
        super().__init__()
        dim, heads, D, kv = cfg.hidden_size, cfg.num_attention_heads, spec.head_dim, spec.num_kv_heads
        self.heads, self.kv_heads, self.scale = heads, kv, cfg.query_scale
        self.query_only, self.k_eq_v, self.v_norm = query_only, spec.k_eq_v, cfg.v_norm
        self.eps = cfg.rms_norm_eps
        self.q_proj = nn.Linear(dim, heads * D, bias=False)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps, cfg.norm_offset)
        self.o_proj = nn.Linear(heads * D, dim, bias=False)
        self.rope = RoPE(spec.rope)
        if not query_only:
            self.k_proj = nn.Linear(dim, kv * D, bias=False)
            if not spec.k_eq_v:
                self.v_proj = nn.Linear(dim, kv * D, bias=False)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, cfg.norm_offset)

    def _keys_values(self, x: mx.array, offset: int) -> tuple[mx.array, mx.array]:
        B, L, _ = x.shape
        k = self.k_proj(x).reshape(B, L, self.kv_heads, -1)
        # k_eq_v layers take V from the raw K projection, before k_norm and RoPE.
        v = k if self.k_eq_v else self.v_proj(x).reshape(B, L, self.kv_heads, -1)
        if self.v_norm:
            v = mx.fast.rms_norm(v, None, self.eps)
        k = self.rope(self.k_norm(k).transpose(0, 2, 1, 3), offset)
        return k, v.transpose(0, 2, 1, 3)

    def __call__(
        self,
        x: mx.array,
        mask: Mask,
        cache: Cache | None = None,
        shared: tuple[mx.array, mx.array, int] | None = None,
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """`x [B, L, dim]` -> (output, the K/V attended to). A query-only layer takes `shared`:
        keys, values and the position of its first query."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.heads, -1)).transpose(0, 2, 1, 3)
        if self.query_only:
            k, v, offset = shared
        else:
            offset = 0 if cache is None else cache.offset
            k, v = self._keys_values(x, offset)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
        q = self.rope(q, offset)
        out = attend(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One layer of the target, or (`query_only`) of the MTP drafter, which reads the target's K/V."""

    def __init__(self, cfg: TextConfig, spec: LayerSpec, query_only: bool = False):
        super().__init__()
        dim, eps, off = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset
        self.self_attn = Attention(cfg, spec, query_only)
        self.mlp = MLP(dim, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(dim, eps, off)
        self.post_attention_layernorm = RMSNorm(dim, eps, off)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps, off)
        self.post_feedforward_layernorm = RMSNorm(dim, eps, off)
        self.use_layer_scalar = cfg.layer_scalar
        if cfg.layer_scalar:
            self.layer_scalar = mx.ones((1,))

    def __call__(self, x: mx.array, mask: Mask, cache: Cache | None = None, shared=None):
        h, kv = self.self_attn(self.input_layernorm(x), mask, cache, shared)
        x = x + self.post_attention_layernorm(h)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if self.use_layer_scalar:  # Gemma 4 scales the whole residual stream, after both adds
            x = x * self.layer_scalar
        return x, kv


@dataclass
class ModelOutput:
    """`logits [B, L', V]`; `hidden [B, L, dim]` after the final norm; `shared_kv` maps a layer type
    to the K/V (`[B, Hkv, K, D]`) its last layer attended to, for the MTP drafter."""

    logits: mx.array
    hidden: mx.array
    shared_kv: dict[str, tuple[mx.array, mx.array]]


class TextModel(nn.Module):
    """Embedding, decoder layers, final norm. With `query_only` layers (the MTP drafter) it reads
    the K/V of another model instead of keeping caches."""

    def __init__(self, cfg: TextConfig, query_only: bool = False):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, spec, query_only) for spec in cfg.layers]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.last_of_type = last_of_type(cfg)

    def embed(self, ids: mx.array) -> mx.array:
        h = self.embed_tokens(ids)
        # HF casts sqrt(hidden) to the weight dtype first (62.0 in bf16 for the 12B).
        return h * mx.array(self.config.embed_scale, dtype=h.dtype)

    def __call__(
        self,
        h: mx.array,
        cache: list[Cache] | None = None,
        block_ids: mx.array | None = None,
        shared: dict[str, SharedView] | None = None,
        position: int = 0,
    ) -> tuple[mx.array, dict[str, tuple[mx.array, mx.array]]]:
        """`h [B, L, dim]` -> (final-norm hidden, the K/V the last layer of each type attended to).
        Query-only layers take `shared` (keys, values, mask per layer type) and the `position` of
        the first query."""
        cfg = self.config
        if shared is not None:
            for layer, t in zip(self.layers, cfg.layer_types, strict=True):
                k, v, mask = shared[t]
                h, _ = layer(h, mask, shared=(k, v, position))
            return self.norm(h), {}
        cache = cache or [None] * len(self.layers)
        h, kv_out = run_layers(self.layers, range(len(self.layers)), cfg, h, cache, block_ids)
        return self.norm(h), kv_out


def last_of_type(cfg: TextConfig) -> dict[str, int]:
    """Layer type -> the number of the model's last layer of that type."""
    types = cfg.layer_types
    return {t: len(types) - 1 - types[::-1].index(t) for t in set(types)}


def run_layers(
    layers: Sequence[DecoderLayer],
    indices: range,
    cfg: TextConfig,
    h: mx.array,
    cache: Sequence[Cache | None],
    block_ids: mx.array | None,
) -> tuple[mx.array, dict[str, tuple[mx.array, mx.array]]]:
    """Run decoder layers with the model's layer numbers `indices` (all of them, or a pipeline
    stage's) and their caches: one mask per layer type, from the first cache of that type. ->
    (hidden, the K/V of the model's last layer of each type, where it is among them)."""
    types = [cfg.layer_types[i] for i in indices]
    masks = {
        t: attention_mask(
            cache[types.index(t)],
            h.shape[1],
            cfg.sliding_window if t == SLIDING else None,
            block_ids if t == SLIDING else None,
        )
        for t in set(types)
    }
    last = {i: t for t, i in last_of_type(cfg).items()}
    kv_out = {}
    for layer, c, t, i in zip(layers, cache, types, indices, strict=True):
        h, kv = layer(h, masks[t], c)
        if i in last:
            kv_out[t] = kv
    return h, kv_out


def float_dtype(linear: nn.Module) -> mx.Dtype | None:
    """The float dtype a Linear computes in: its weight's, or a quantized one's scales/biases'
    (the packed weight is uint32; fp-mode scales are uint8, which leaves the input as it is)."""
    for name in ("weight", "scales", "biases"):
        a = linear.get(name)
        if a is not None and mx.issubdtype(a.dtype, mx.floating):
            return a.dtype
    return None


class VisionEmbedder(nn.Module):
    """Raw 48x48 patches -> LN -> Linear -> LN -> + factorized (x, y) position table -> LN."""

    def __init__(self, patch_dim: int, dim: int, posemb_size: int):
        super().__init__()
        self.patch_ln1 = nn.LayerNorm(patch_dim, eps=1e-5)
        self.patch_dense = nn.Linear(patch_dim, dim)
        self.patch_ln2 = nn.LayerNorm(dim, eps=1e-5)
        self.pos_embedding = mx.zeros((posemb_size, 2, dim))
        self.pos_norm = nn.LayerNorm(dim, eps=1e-5)

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        """`patches [n, P, patch_dim]`, `positions [n, P, 2]` (x, y; -1 = padding) -> `[n, P, dim]`."""
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(patches.astype(self.patch_ln1.weight.dtype))))
        valid = (positions >= 0)[..., None].astype(h.dtype)
        pos = mx.maximum(positions, 0)
        h = (
            h
            + self.pos_embedding[pos[..., 0], 0] * valid[..., 0, :]
            + self.pos_embedding[pos[..., 1], 1] * valid[..., 1, :]
        )
        return self.pos_norm(h)


class MultimodalEmbedder(nn.Module):
    """Weightless RMSNorm -> Linear into the text width (shared by vision and audio)."""

    def __init__(self, in_dims: int, out_dims: int, eps: float):
        super().__init__()
        self.embedding_projection = nn.Linear(in_dims, out_dims, bias=False)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        dtype = float_dtype(self.embedding_projection)
        x = x if dtype is None else x.astype(dtype)
        return self.embedding_projection(mx.fast.rms_norm(x, None, self.eps))


# Top-level modules of `Model`; any other on-disk name belongs to the text model.
PARTS = ("language_model.", "vision_embedder.", "embed_vision.", "embed_audio.")


class Model(nn.Module):
    """Gemma text model, or the unified 12B (text + encoder-free vision and audio embedders).

    Parameter names follow the checkpoint files with the leading `model.` dropped.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        text = config.text
        self.language_model = TextModel(text)
        if config.vision is not None:
            v = config.vision
            self.vision_embedder = VisionEmbedder(v.patch_dim, v.mm_embed_dim, v.mm_posemb_size)
            self.embed_vision = MultimodalEmbedder(v.output_proj_dims, text.hidden_size, v.rms_norm_eps)
        if config.audio is not None:
            a = config.audio
            self.embed_audio = MultimodalEmbedder(a.audio_embed_dim, text.hidden_size, a.rms_norm_eps)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.language_model.layers

    def make_cache(
        self, slack: int = 128, kv_bits: KVBits = None, quantize_rings: bool = True
    ) -> list[Cache]:
        """One cache per layer: a ring of `window + slack` slots on sliding layers, else growing.
        `kv_bits` (bits, group_size) stores keys/values quantized (the rings too, unless not
        `quantize_rings`)."""
        w = self.config.text.sliding_window
        return [
            RingKVCache(w, slack, kv_bits if quantize_rings else None) if s.sliding else KVCache(kv_bits)
            for s in self.config.text.layers
        ]

    def logits(self, hidden: mx.array) -> mx.array:
        out = self.language_model.embed_tokens.as_linear(hidden)  # tied head, not scaled
        cap = self.config.text.final_logit_softcapping
        return out if cap is None else mx.tanh(out / cap) * cap

    def _scatter(self, h: mx.array, slots: np.ndarray, features: mx.array, valid: np.ndarray, what: str):
        """Write the valid rows of `features [n, T, dim]` into the `slots` of `h [B, L, dim]`."""
        rows = np.flatnonzero(valid.reshape(-1))
        if len(rows) != len(slots):
            raise ValueError(
                f"{what}: {len(rows)} soft tokens for {len(slots)} placeholder tokens in the prompt"
            )
        flat = h.reshape(-1, h.shape[-1])
        flat[mx.array(slots)] = features.reshape(-1, features.shape[-1])[mx.array(rows)].astype(h.dtype)
        return flat.reshape(h.shape)

    def embed_inputs(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        image_position_ids: mx.array | None = None,
        input_features: mx.array | None = None,
        input_features_mask: mx.array | None = None,
        pixel_values_videos: mx.array | None = None,
        video_position_ids: mx.array | None = None,
    ) -> tuple[mx.array, mx.array | None]:
        """Token embeddings with image/video/audio soft tokens scattered into their placeholder
        slots (not scaled by sqrt(hidden), as in the reference), and the vision block id of every
        position (`[B, L]`, -1 = none) for the bidirectional sliding-layer mask: each run of image
        or video tokens (an image, or one frame of a video) is a block.

        `pixel_values [n, P, 6912]` with `image_position_ids [n, P, 2]` (-1 = padding);
        `pixel_values_videos [frames, P, 6912]` with `video_position_ids` likewise (the frames of
        all videos, through the same vision embedder); `input_features [m, F, 640]` with
        `input_features_mask [m, F]` (True = valid).
        """
        cfg = self.config
        ids = np.array(input_ids)
        is_image, is_video = ids == cfg.image_token_id, ids == cfg.video_token_id
        is_audio = ids == cfg.audio_token_id
        is_vision = is_image | is_video
        h = self.language_model.embed(mx.array(np.where(is_vision | is_audio, cfg.text.pad_token_id, ids)))
        for what, pixels, pos, slots in (
            ("images", pixel_values, image_position_ids, is_image),
            ("video frames", pixel_values_videos, video_position_ids, is_video),
        ):
            if pixels is None:
                continue
            if cfg.vision is None:
                raise ValueError(f"{what} given, but this model has no vision embedder")
            positions = np.array(pos)
            features = self.embed_vision(self.vision_embedder(pixels, mx.array(positions)))
            h = self._scatter(h, np.flatnonzero(slots), features, (positions != -1).all(-1), what)
        if input_features is not None:
            if cfg.audio is None:
                raise ValueError("input_features given, but this model has no audio embedder")
            valid = (
                np.ones(input_features.shape[:2], bool)
                if input_features_mask is None
                else np.array(input_features_mask)
            )
            h = self._scatter(h, np.flatnonzero(is_audio), self.embed_audio(input_features), valid, "audio")
        if not (cfg.text.bidirectional_vision and is_vision.any()):
            return h, None
        # HF `get_block_sequence_ids_for_mask`: each contiguous run of image/video tokens is a block.
        starts = is_vision & ~np.concatenate([np.zeros_like(is_vision[:, :1]), is_vision[:, :-1]], axis=1)
        return h, mx.array(np.where(is_vision, np.cumsum(starts, axis=1) - 1, -1).astype(np.int32))

    def forward(
        self,
        input_ids: mx.array | None = None,
        cache: list[Cache] | None = None,
        *,
        inputs_embeds: mx.array | None = None,
        block_ids: mx.array | None = None,
        pixel_values: mx.array | None = None,
        image_position_ids: mx.array | None = None,
        input_features: mx.array | None = None,
        input_features_mask: mx.array | None = None,
        pixel_values_videos: mx.array | None = None,
        video_position_ids: mx.array | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """`input_ids [B, L]` (or `inputs_embeds [B, L, dim]`) -> `ModelOutput`: logits, the final
        hidden state and the K/V of the last layer of each type (what the MTP drafter reads).

        Images, video frames and audio use the reference's names and shapes (see `embed_inputs`);
        a prefill chunk must hold whole image blocks. `logits_to_keep` > 0 computes logits for the last that
        many positions only (prefill needs one).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None and input_ids.ndim == 1:
            input_ids = input_ids[None]
        if pixel_values is not None or input_features is not None or pixel_values_videos is not None:
            inputs_embeds, block_ids = self.embed_inputs(
                input_ids,
                pixel_values,
                image_position_ids,
                input_features,
                input_features_mask,
                pixel_values_videos,
                video_position_ids,
            )
        elif inputs_embeds is None:
            inputs_embeds = self.language_model.embed(input_ids)
        n = self.config.text.num_hidden_layers
        if cache is not None and len(cache) != n:
            raise ValueError(f"cache has {len(cache)} entries, the model has {n} layers")
        hidden, shared = self.run_decoder(inputs_embeds, cache, block_ids)
        logits = self.logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return ModelOutput(logits, hidden, shared)

    def run_decoder(
        self, h: mx.array, cache: list[Cache] | None, block_ids: mx.array | None
    ) -> tuple[mx.array, dict[str, tuple[mx.array, mx.array]]]:
        """Input embeddings -> (final-norm hidden, shared K/V): the decoder layers, which a
        pipeline (`gemma_mlx.distributed`) runs partly on other ranks."""
        return self.language_model(h, cache, block_ids)

    def __call__(
        self, input_ids: mx.array | None = None, cache: list[Cache] | None = None, **kwargs
    ) -> mx.array:
        """Logits `[B, L, vocab]` (or the last `logits_to_keep`); the arguments of `forward`."""
        return self.forward(input_ids, cache, **kwargs).logits

    def prefill_chunks(self, chunks: list[dict], cache: list[Cache], done: Callable[[int], None]) -> None:
        """Run prompt chunks (`forward` keyword arguments) into `cache` one after the other, each
        evaluated, `done(i)` after chunk i (a pipeline overlaps its stages across chunks here)."""
        for i, chunk in enumerate(chunks):
            self.forward(**chunk, cache=cache, logits_to_keep=1)
            mx.eval([c.state for c in cache])
            done(i)

    def saved_name(self, name: str) -> str:
        """Our parameter or module name -> the one the MLX ecosystem saves (mlx-vlm's
        `language_model.model.*` for the unified model, mlx-lm's `model.*` for a bare text model),
        so that mlx-vlm and mlx-lm load what we write; `sanitize` maps it back."""
        if not name.startswith("language_model."):
            return name
        return ("language_model.model." if self.config.multimodal else "model.") + name.removeprefix(
            "language_model."
        )

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map on-disk names to ours, for every layout in use: Hugging Face (`model.language_model.*`,
        a bare text model's `model.layers...`), mlx-vlm / mlx-community (`language_model.model.*`),
        mlx-lm (`model.layers...`) and ours (`language_model.layers...`). The tied head
        (`lm_head.*`) is dropped. Also maps quantization-block module paths (`checkpoint`)."""
        out = {}
        for k, v in weights.items():
            if k.startswith("lm_head."):
                continue
            k = k.removeprefix("model.")
            if k.startswith("language_model.model."):
                k = "language_model." + k.removeprefix("language_model.model.")
            elif not k.startswith(PARTS):
                k = "language_model." + k
            out[k] = v
        return out
