"""Quantization plans: which layer gets which bits, the config block that records it, and what
the result weighs on disk and per decoded token.

Every text Linear (MLP, attention) and the tied embedding (which is also the LM head) are quantized
(the vision/audio projections only on request, `MULTIMODAL`) with MLX's own quantizer
(`mx.quantize`, the same as `nn.quantize`);
norms, layer scalars, the vision position table and LayerNorms are not Linear/Embedding modules
and stay in float. Everything here works on a lazy model skeleton: shapes only, no weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from gemma_mlx.config import (
    QUANT_DEFAULT_GROUP,
    QUANT_GROUPS,
    QUANT_MODES,
    ModelConfig,
    load_config,
    parse_config,
)
from gemma_mlx.footprint import decode_bytes
from gemma_mlx.models.gemma import Model

# Bits each mode offers and the group size it uses by default (the fp modes allow only that one).
MODES = QUANT_MODES
DEFAULT_GROUP = QUANT_DEFAULT_GROUP
AFFINE_GROUPS = QUANT_GROUPS["affine"]
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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
        if self.mode == "affine" and self.group_size not in AFFINE_GROUPS:
            raise ValueError(f"--group-size {self.group_size}: expected 32, 64 or 128")
        if self.mode != "affine" and self.group_size != DEFAULT_GROUP[self.mode]:
            raise ValueError(
                f"--group-size {self.group_size}: mode {self.mode} uses {DEFAULT_GROUP[self.mode]}"
            )

    @classmethod
    def make(cls, bits: int = 4, group_size: int | None = None, mode: str = "affine") -> QuantSpec:
        """A spec whose group size defaults to the mode's (affine 64, mxfp 32, nvfp4 16)."""
        if mode not in MODES:
            raise ValueError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
        return cls(bits, DEFAULT_GROUP[mode] if group_size is None else group_size, mode)  # 0 is no default

    def nbytes(self, rows: int, cols: int, float_bytes: int = 2) -> int:
        """Stored bytes of a quantized `[rows, cols]` weight: packed values plus one scale per
        group (and one bias for affine) in the float dtype; the fp modes store uint8 scales."""
        groups = rows * cols // self.group_size
        per_group = 2 * float_bytes if self.mode == "affine" else 1
        return rows * cols * self.bits // 8 + groups * per_group

    def bits_per_weight(self, float_bytes: int = 2) -> float:
        return 8 * self.nbytes(1, self.group_size, float_bytes) / self.group_size

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mode} {self.bits}-bit, group {self.group_size}"


@cache
def check_supported(spec: QuantSpec) -> None:
    """Raise unless the installed MLX can quantize with `spec` (older MLX lacks the fp modes)."""
    try:
        mx.eval(mx.quantize(mx.zeros((1, 128)), group_size=spec.group_size, bits=spec.bits, mode=spec.mode))
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"this MLX ({mx.__version__}) cannot quantize {spec}: {e}") from None


# Mixed recipes, named as in mlx-lm/mlx-vlm: `mixed_L_H` keeps L bits everywhere and H bits on
# the layers llama.cpp's Q4_K_M favours (mlx-lm `mixed_quant_predicate_builder`): `v_proj` and
# `down_proj` of the first and last eighth of the layers and of every third layer between
# (they write straight into the residual stream), and the LM head (here the tied embedding).
# Same rule as mlx-lm, so our `mixed_4_6` has the layout users know from mlx-community.
# `mlp_8bit` is what early community "4-bit" 12B conversions shipped (every MLP at 8 bits;
# 10.98 GB read per token instead of 6.74): for comparisons, never a default.
RECIPES: dict[str, tuple[int, int] | None] = {
    "uniform": None,
    "mixed_2_6": (2, 6),
    "mixed_3_4": (3, 4),
    "mixed_3_5": (3, 5),
    "mixed_3_6": (3, 6),
    "mixed_3_8": (3, 8),
    "mixed_4_6": (4, 6),
    "mixed_4_8": (4, 8),
    "mlp_8bit": (4, 8),
}
SENSITIVE = re.compile(r"(self_attn\.v_proj|mlp\.down_proj)$")
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def favoured_layer(i: int, n: int) -> bool:
    """mlx-lm's `use_more_bits`: first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> Linear/Embedding of a model skeleton, the layers that can be quantized."""
    return {
        p: m
        for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, nn.Linear | nn.Embedding)
    }


Override = QuantSpec | int | bool | None
# The vision and audio projections stay float by default, as mlx-vlm keeps them: 4-bit moves the
# image/audio features by 9-12 % RMS and image+audio-prompt logits by 0.38 relative RMS on the tiny
# model (8-bit: 0.019), for 63 MB of 6.74 GB on the 12B and nothing per decoded token (measured).
MULTIMODAL = ("vision_embedder.", "embed_vision.", "embed_audio.")


def parse_override(text: str, base: QuantSpec) -> tuple[str, QuantSpec | None]:
    """`PATTERN=SPEC` from the command line; SPEC is `float`, `BITS`, `BITS:GROUP` (affine) or a
    fp mode name (`mxfp4`, `mxfp8`, `nvfp4`). PATTERN is a regex searched in module paths."""
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern:
        raise ValueError(f"--override {text!r}: expected PATTERN=SPEC, e.g. 'mlp\\.down_proj=6'")
    re.compile(pattern)
    spec = spec.strip().lower()
    if spec in ("float", "none", "false"):
        return pattern, None
    if spec in MODES and spec != "affine":
        return pattern, QuantSpec.make(MODES[spec][0], None, spec)
    try:
        bits, _, group = spec.partition(":")
        group_size = int(group) if group else (base.group_size if base.mode == "affine" else 64)
        return pattern, QuantSpec(int(bits), group_size, "affine")
    except ValueError as e:
        raise ValueError(f"--override {text!r}: {e}") from None


def _as_spec(value: Override, base: QuantSpec) -> QuantSpec | None:
    if value is None or value is False:
        return None
    if value is True:
        return base
    if isinstance(value, int):
        return QuantSpec(value, base.group_size, base.mode)
    return value


def plan(
    model: nn.Module,
    spec: QuantSpec,
    recipe: str | None = None,
    quantize_embedding: bool = True,
    overrides: Mapping[str, Override] | None = None,
    notes: dict[str, str] | None = None,
    quantize_multimodal: bool = False,
) -> dict[str, QuantSpec | None]:
    """The quantization of every quantizable layer of `model` (None = stays float).

    Recipe first, then `overrides` (regex on the module path -> spec, bits, or None for float;
    later patterns win). Layers whose input width is not a multiple of their group size stay
    float, as `nn.quantize` would refuse them. `notes` (if given) receives path -> why float."""
    recipe = recipe or "uniform"
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    if RECIPES[recipe] is not None and spec.mode != "affine":
        raise ValueError(f"--recipe {recipe}: mixed recipes are affine only (got --mode {spec.mode})")
    layers = quantizable(model)
    indices = [int(m.group(1)) for p in layers if (m := LAYER_INDEX.search(p))]
    n = max(indices) + 1 if indices else 0
    notes = {} if notes is None else notes
    out: dict[str, QuantSpec | None] = {}
    for path, module in layers.items():
        s: QuantSpec | None = spec
        if (low_high := RECIPES[recipe]) is not None:
            if recipe == "mlp_8bit":
                high = ".mlp." in path
            elif isinstance(module, nn.Embedding):
                high = True  # the tied LM head
            else:
                m = LAYER_INDEX.search(path)
                high = bool(SENSITIVE.search(path)) and m is not None and favoured_layer(int(m.group(1)), n)
            s = QuantSpec(low_high[1] if high else low_high[0], spec.group_size, spec.mode)
        if isinstance(module, nn.Embedding) and not quantize_embedding:
            s, notes[path] = None, "embedding kept (--keep-embedding)"
        if path.startswith(MULTIMODAL) and not quantize_multimodal:
            s, notes[path] = None, "vision/audio projection kept (default; --quantize-multimodal)"
        for pattern, value in (overrides or {}).items():
            if re.search(pattern, path):
                s = _as_spec(value, spec)
                if s is None:
                    notes[path] = f"override {pattern!r}"
                else:
                    notes.pop(path, None)
        width = module.weight.shape[-1]
        if s is not None and width % s.group_size:
            notes[path] = f"input width {width} not a multiple of group size {s.group_size}"
            s = None
        out[path] = s
    return out


def config_block(layout: Mapping[str, QuantSpec | None], spec: QuantSpec) -> dict:
    """The mlx-lm / mlx-vlm `quantization` schema: global `group_size`/`bits`/`mode`, plus
    per-module-path entries for layers that differ (a dict) or stay float (`false`)."""
    block: dict = {"group_size": spec.group_size, "bits": spec.bits, "mode": spec.mode}
    for path, s in layout.items():
        if s is None:
            block[path] = False
        elif s != spec:
            block[path] = s.as_dict()
    return block


def layout_sizes(
    model: nn.Module,
    layout: Mapping[str, QuantSpec | None] | None,
    float_bytes: int | Mapping[str, int] = 2,
) -> dict[str, int]:
    """Stored bytes of each parameter of `model` under `layout` (a quantized weight as packed
    values + scales [+ biases]; everything else in float). `float_bytes`: the float element size,
    one for all or per parameter name (a conversion without --dtype keeps each source dtype)."""
    layout = layout or {}
    sizes = {}
    for name, p in tree_flatten(model.parameters()):
        fb = float_bytes if isinstance(float_bytes, int) else float_bytes.get(name, 2)
        path, _, leaf = name.rpartition(".")
        s = layout.get(path)
        if s is not None and leaf == "weight":
            sizes[name] = s.nbytes(p.size // p.shape[-1], p.shape[-1], fb)
        else:
            sizes[name] = p.size * fb
    return sizes


def layout_bytes(
    model: nn.Module, layout: Mapping[str, QuantSpec | None] | None, float_bytes: int = 2, prefix: str = ""
) -> int:
    """Stored bytes of the parameters of `model` whose names start with `prefix`, under `layout`."""
    return decode_bytes(layout_sizes(model, layout, float_bytes), prefix)


def bytes_per_token(
    model: nn.Module, layout: Mapping[str, QuantSpec | None] | None, float_bytes: int = 2
) -> int:
    """Bytes of weights a decoded token reads (`gemma_mlx.footprint.decode_bytes`)."""
    return decode_bytes(layout_sizes(model, layout, float_bytes))


def source_dtype(raw: Mapping) -> str:
    """The float dtype a config records for its weights (`dtype`/`torch_dtype`, top level or in
    text_config), bfloat16 where it names none: what a conversion without --dtype keeps."""
    for d in (raw, raw.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(d, Mapping) and d.get(key) in FLOAT_BYTES:
                return d[key]
    return "bfloat16"


@dataclass(frozen=True)
class Estimate:
    parameters: int
    weight_bytes: int  # all stored tensors (text, vision, audio)
    bytes_per_token: int
    kept_float: dict[str, str] = field(default_factory=dict)  # quantizable layers left in float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / self.parameters


def estimate(
    config,
    *,
    bits: int = 4,
    group_size: int | None = None,
    mode: str = "affine",
    recipe: str | None = None,
    quantize: bool = True,
    quantize_embedding: bool = True,
    overrides: Mapping[str, Override] | None = None,
    dtype: str | None = None,
    quantize_multimodal: bool = False,
) -> Estimate:
    """Size and bytes per decoded token of a conversion, from the config alone (a `ModelConfig`,
    a config dict, or a checkpoint directory / config.json path): the model skeleton is built
    lazily, so no weight is read or allocated. `dtype` None: as `convert` without --dtype, the
    source's float dtype as its config records it."""
    if isinstance(config, str | Path):
        config = load_config(config)
    elif not isinstance(config, ModelConfig):
        config = parse_config(config)
    dtype = dtype or source_dtype(config.raw)
    if dtype not in FLOAT_BYTES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(FLOAT_BYTES)}")
    model, notes = Model(config), {}
    spec = QuantSpec.make(bits, group_size, mode)
    layout = (
        plan(model, spec, recipe, quantize_embedding, overrides, notes, quantize_multimodal)
        if quantize
        else {}
    )
    fb = FLOAT_BYTES[dtype]
    return Estimate(
        parameters=sum(p.size for _, p in tree_flatten(model.parameters())),
        weight_bytes=layout_bytes(model, layout, fb),
        bytes_per_token=bytes_per_token(model, layout, fb),
        kept_float={p: notes[p] for p, s in layout.items() if s is None},
    )


def quantize_weight(w: mx.array, spec: QuantSpec, dtype: mx.Dtype) -> dict[str, mx.array]:
    """`{"weight", "scales"[, "biases"]}` of one tensor, quantized by MLX in `dtype` (so affine
    scales/biases come out in the dtype of the float parts; fp modes keep uint8 scales)."""
    out = mx.quantize(w.astype(dtype), group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    return dict(zip(("weight", "scales", "biases"), out, strict=False))
