"""Quantization plans: which weight gets which bits, the config block that records it, and the
bytes a decoded token reads.

Every Linear and the tied embedding (also the LM head) are quantized with MLX's quantizer;
norms, layer scalars, the vision position table and LayerNorms stay in float. Recipes raise the
bits of the layers most sensitive to quantization.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

MODES = {"affine": (2, 3, 4, 5, 6, 8), "mxfp4": (4,), "mxfp8": (8,), "nvfp4": (4,)}
DEFAULT_GROUP = {"affine": 64, "mxfp4": 32, "mxfp8": 32, "nvfp4": 16}


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.bits not in MODES[self.mode]:
            raise ValueError(f"--bits {self.bits}: mode {self.mode} supports {MODES[self.mode]}")
        if self.mode == "affine" and self.group_size not in (32, 64, 128):
            raise ValueError(f"--group-size {self.group_size}: expected 32, 64 or 128")
        if self.mode != "affine" and self.group_size != DEFAULT_GROUP[self.mode]:
            raise ValueError(
                f"--group-size {self.group_size}: mode {self.mode} uses {DEFAULT_GROUP[self.mode]}"
            )

    def bits_per_weight(self, scale_bytes: int = 2) -> float:
        """Stored bits per weight including the per-group scale (and bias for affine)."""
        if self.mode == "affine":
            return self.bits + 2 * scale_bytes * 8 / self.group_size
        return self.bits + 8 / self.group_size  # one uint8 scale per group

    def as_dict(self) -> dict:
        return asdict(self)


# Sensitive layers: the value path and the MLP output projection carry errors straight into the
# residual stream, and the tied embedding is also the LM head (measured on Gemma 3 270M: the MLP
# dominates the 4-bit loss). `mixed_A_B` keeps A bits elsewhere and B bits on those.
SENSITIVE = re.compile(r"(self_attn\.v_proj|mlp\.down_proj|embed_tokens)$")
RECIPES = {
    "uniform": None,
    "mixed_3_6": (3, 6),
    "mixed_4_6": (4, 6),
    "mixed_4_8": (4, 8),
    # what early community "4-bit" 12B conversions shipped: every MLP at 8 bits (for comparison)
    "mlp_8bit": (4, 8),
}


def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> Linear/Embedding of a model skeleton, the layers that can be quantized."""
    return {
        p: m
        for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, nn.Linear | nn.Embedding)
    }


def plan(
    model: nn.Module,
    spec: QuantSpec,
    recipe: str = "uniform",
    quantize_embedding: bool = True,
    overrides: dict[str, QuantSpec | None] | None = None,
) -> dict[str, QuantSpec | None]:
    """The quantization of every quantizable layer (None = stays float). Layers whose input width
    is not a multiple of the group size stay float."""
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    out: dict[str, QuantSpec | None] = {}
    for path, module in quantizable(model).items():
        s: QuantSpec | None = spec
        bits = RECIPES[recipe]
        if bits is not None:
            sensitive = "mlp." in path if recipe == "mlp_8bit" else bool(SENSITIVE.search(path))
            s = QuantSpec(bits[1] if sensitive else bits[0], spec.group_size, spec.mode)
        if isinstance(module, nn.Embedding) and not quantize_embedding:
            s = None
        for pattern, o in (overrides or {}).items():
            if re.search(pattern, path):
                s = o
        if s is not None and module.weight.shape[-1] % s.group_size:
            s = None
        out[path] = s
    return out


def config_block(layout: dict[str, QuantSpec | None], spec: QuantSpec) -> dict:
    """mlx-lm / mlx-vlm `quantization` schema: global settings plus per-path exceptions
    (a dict for other settings, false for a layer kept in float)."""
    block: dict = spec.as_dict()
    for path, s in layout.items():
        if s is None:
            block[path] = False
        elif s != spec:
            block[path] = s.as_dict()
    return block


def bytes_per_token(
    model: nn.Module, layout: dict[str, QuantSpec | None] | None, float_bytes: int = 2
) -> int:
    """Bytes of weights a decoded token reads: every text weight once (the tied embedding once,
    as the LM head; the row lookup is negligible); vision and audio weights are idle.

    Works on a lazy skeleton (nothing allocated): only shapes are used."""
    layout = layout or {}
    total = 0
    for name, p in tree_flatten(model.parameters()):
        if not name.startswith("language_model."):
            continue
        path, _, leaf = name.rpartition(".")
        s = layout.get(path)
        if s is not None and leaf == "weight":
            total += round(p.size * s.bits_per_weight(float_bytes) / 8)
        elif s is None or leaf not in ("scales", "biases"):
            total += p.size * float_bytes
    return total


def quantize_weight(w: mx.array, spec: QuantSpec, dtype: mx.Dtype) -> dict[str, mx.array]:
    """`{"weight", "scales"[, "biases"]}` of one quantized tensor (scales in `dtype`)."""
    out = mx.quantize(w.astype(dtype), group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    parts = dict(zip(("weight", "scales", "biases"), out, strict=False))  # fp modes have no biases
    if spec.mode == "affine":  # fp modes keep uint8 scales
        parts["scales"], parts["biases"] = parts["scales"].astype(dtype), parts["biases"].astype(dtype)
    return parts
