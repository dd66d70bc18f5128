"""Checks of loaded weights that names and shapes cannot catch: dtypes, and optionally values.

An int32 projection or a bool norm has the right shape and would load and run, producing
garbage text; a NaN weight silently yields `<pad>` forever. Both are refused by name here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx

from .safetensors_file import CheckpointError


def listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def check_dtypes(weights: Mapping[str, mx.array], expected: Mapping[str, mx.array], path: str | Path) -> None:
    """Each weight must have the kind of dtype its parameter in the model skeleton has: any float
    where the skeleton is float; exactly the skeleton's dtype otherwise (what MLX writes for a
    quantized layer: uint32 packed weights, uint8 scales of the fp modes)."""
    wrong = []
    for name, p in expected.items():
        w = weights.get(name)
        if w is None:
            continue
        if mx.issubdtype(p.dtype, mx.floating):
            if not mx.issubdtype(w.dtype, mx.floating):
                wrong.append(f"{name} is {w.dtype} (expected a float dtype)")
        elif w.dtype != p.dtype:
            wrong.append(f"{name} is {w.dtype} (expected {p.dtype})")
    if wrong:
        raise CheckpointError(f"{path}: weights of the wrong dtype: {listing(sorted(wrong))}")


def refuse_non_finite(weights: Mapping[str, mx.array], path: str | Path) -> None:
    """Refuse NaN or infinite values, naming the tensors (reads every float weight once)."""
    bad = [
        name
        for name, w in weights.items()
        if mx.issubdtype(w.dtype, mx.floating) and not mx.all(mx.isfinite(w)).item()
    ]
    if bad:
        raise CheckpointError(f"{path}: non-finite (NaN or infinite) values in {listing(sorted(bad))}")
