"""Rotary position embedding of one layer type, built from the parsed config (`config.Rope`)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import Rope


class RoPE(nn.Module):
    """`mx.fast.rope` with the layer type's base, scale, or explicit wavelengths (Gemma 4's
    proportional RoPE: zero frequencies beyond the rotated fraction are infinite wavelengths)."""

    def __init__(self, rope: Rope):
        super().__init__()
        self.dims, self.base, self.scale = rope.dims, rope.base, rope.scale
        self._freqs = None if rope.freqs is None else mx.array(rope.freqs, dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        """`x [B, H, L, D]` whose first token sits at position `offset`."""
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=self.base,
            scale=self.scale,
            offset=offset,
            freqs=self._freqs,
        )
