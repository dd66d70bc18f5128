"""Reading checkpoint directories: config, lazily loaded safetensors shards, name mapping, checks.

Only safetensors are read (never pickles) and no code from a checkpoint is ever executed.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import load_config, parse_drafter_config, read_config
from .models.drafter import Drafter
from .models.gemma import Model
from .safetensors_file import CheckpointError, read_header, shard_files
from .weight_checks import check_dtypes, listing, refuse_non_finite

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def read_weights(path: str | Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint directory, loaded lazily (memory-mapped until evaluated);
    every shard's header is checked first (`safetensors_file.read_header`)."""
    weights: dict[str, mx.array] = {}
    for f in shard_files(path):
        read_header(f)
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # MLX raises RuntimeError/ValueError for bad headers and truncation
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return weights


QUANT_KEYS = ("group_size", "bits", "mode")


def layer_quantization(module: nn.Module, q: dict, names: Collection[str]) -> dict[str, dict]:
    """Module path (ours) -> `{group_size, bits, mode}` of every layer stored quantized (its
    `<path>.scales` among `names`, our names). `q` is the mlx-lm / mlx-vlm `quantization` block:
    global `group_size`/`bits`/`mode`, and per-layer overrides keyed by module path in the
    writer's own naming (mapped by the module's `sanitize`, like the tensor names)."""
    default = {k: q[k] for k in QUANT_KEYS if k in q}
    overrides = {}
    for key, value in q.items():
        if isinstance(value, dict):
            name = next(iter(module.sanitize({f"{key}.weight": None})), None)
            if name is not None:
                overrides[name.removesuffix(".weight")] = {k: value[k] for k in QUANT_KEYS if k in value}
    paths = (n.removesuffix(".scales") for n in names if n.endswith(".scales"))
    return {
        p: {"group_size": 64, "bits": 4, "mode": "affine", **default, **overrides.get(p, {})} for p in paths
    }


def quantize_skeleton(module: nn.Module, q: dict, weights: dict[str, mx.array]) -> None:
    """Turn the layers that have quantized tensors on disk into quantized layers (`q`: the config's
    `quantization` block, see `layer_quantization`)."""
    specs = layer_quantization(module, q, weights)
    nn.quantize(module, class_predicate=lambda path, m: specs.get(path, False))


def load_weights(
    module: nn.Module,
    path: Path,
    quantization: dict | None,
    dtype: mx.Dtype | None,
    check_finite: bool = False,
) -> None:
    """Load the checkpoint's tensors into `module` (a `Model` or `Drafter` skeleton), after its
    `sanitize` mapped the names: every parameter checked by name, shape and dtype first, mismatches
    listed; `check_finite` also refuses NaN/infinite values (reading every weight once)."""
    weights = module.sanitize(read_weights(path))
    if quantization:
        quantize_skeleton(module, quantization, weights)
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(
        f"{k} {tuple(weights[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(expected) & set(weights)
        if weights[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        parts = [
            f"{label}: {listing(names)}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if names
        ]
        raise CheckpointError(f"{path}: weights do not match config.json; " + "; ".join(parts))
    check_dtypes(weights, expected, path)
    if check_finite:
        refuse_non_finite(weights, path)
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
        }
    module.load_weights(list(weights.items()), strict=True)


def compute_dtype(quantization: dict | None) -> mx.Dtype | None:
    """The dtype `load` casts float weights to by default ("auto"): on MLX's CPU backend a
    quantized matmul with bfloat16/float16 activations runs several times slower than with float32
    ones (benchmarks/results/backend_dtype_cpu.md), so quantized checkpoints compute in float32 there
    (their scales, biases and norms are cast; the packed weights stay as they are). Elsewhere, and
    for unquantized checkpoints (float32 would double their memory), the stored dtype."""
    return mx.float32 if quantization and mx.default_device() == mx.cpu else None


def resolve_dtype(dtype: str | mx.Dtype | None, quantization: dict | None) -> mx.Dtype | None:
    if dtype == "auto":
        return compute_dtype(quantization)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def load_model(
    path: str | Path, dtype: str | mx.Dtype | None = "auto", lazy: bool = False, check_finite: bool = False
) -> Model:
    """Build the model from `path/config.json` and load its weights (checked by name, shape and
    dtype; with `check_finite`, values too)."""
    path = Path(path)
    config = load_config(path)
    model = Model(config)
    load_weights(model, path, config.quantization, resolve_dtype(dtype, config.quantization), check_finite)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load_drafter(path: str | Path, dtype: str | mx.Dtype | None = "auto") -> Drafter:
    """Load a `gemma4_unified_assistant` (MTP drafter) checkpoint, float or converted."""
    path = Path(path)
    raw = read_config(path)
    drafter = Drafter(parse_drafter_config(raw, str(path / "config.json")))
    load_weights(drafter, path, raw.get("quantization"), resolve_dtype(dtype, raw.get("quantization")))
    mx.eval(drafter.parameters())
    drafter.eval()
    return drafter
