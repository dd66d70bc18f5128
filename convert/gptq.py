"""GPTQ: quantize a Linear's weight column by column, pushing each column's rounding error onto
the columns not yet quantized through the inverse of the calibration Hessian `H = X^T X` (Frantar
et al., 2022), so that `X W_q^T` stays close to `X W^T` on the calibration inputs `X`.

The result is MLX's affine layout exactly: per row and per contiguous group of `group_size`
input columns one scale and one bias (`w = scale * q + bias`, `q` in `[0, 2^bits)`), packed as
`mx.quantize` packs, so `mx.dequantize` / `nn.QuantizedLinear` read it like any other weight.
A group's scale and bias come from MLX's own quantizer applied to the group's (error-updated)
weights when its first column is reached, rounded to the dtype they are stored in.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .quantize import QuantSpec


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes `[rows, cols]` in `[0, 2^bits)` -> MLX's packed uint32 `[rows, cols * bits / 32]`:
    one little-endian bit stream per row (checked against `mx.quantize` for 2-8 bits in the tests)."""
    stream = np.unpackbits(codes.astype(np.uint8)[..., None], axis=-1, bitorder="little")[..., :bits]
    return np.packbits(stream.reshape(codes.shape[0], -1), axis=-1, bitorder="little").view(np.uint32)


def _group_params(w: np.ndarray, spec: QuantSpec, dtype: mx.Dtype) -> tuple[np.ndarray, np.ndarray]:
    """MLX's scale and bias `[rows, 1]` for one group of columns `w [rows, group_size]`, as stored."""
    _, s, b = mx.quantize(mx.array(w, dtype=mx.float32), group_size=spec.group_size, bits=spec.bits)
    as_stored = (np.array(a.astype(dtype).astype(mx.float32), dtype=np.float32) for a in (s, b))
    return tuple(as_stored)  # type: ignore[return-value]


def gptq_quantize(
    w: mx.array,
    hessian: np.ndarray,
    spec: QuantSpec,
    dtype: mx.Dtype,
    damp: float = 0.01,
    block: int = 128,
) -> dict[str, mx.array]:
    """`{"weight", "scales", "biases"}` of `w [rows, cols]` (affine `spec`), error-compensated with
    `hessian [cols, cols]` (`sum X^T X` over the calibration tokens). `damp`: the fraction of the
    mean diagonal added to it (keeps the inverse well conditioned); `block`: columns whose updates
    are applied together (a multiple of the group size). Scales and biases come out in `dtype`.

    Columns go in their natural order: MLX groups are contiguous, and the act-order variant
    (largest diagonal first) would need its groups' parameters fixed before any error update."""
    if spec.mode != "affine":
        raise ValueError(f"gptq quantizes affine layouts only (got {spec})")
    W = np.array(w.astype(mx.float32), dtype=np.float32)
    rows, cols = W.shape
    g = spec.group_size
    block = max(g, block // g * g)
    H = hessian.astype(np.float64).copy()
    dead = np.diag(H) == 0  # a column no calibration token excites: its error costs nothing
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(cols)] += damp * np.mean(np.diag(H))
    # upper Cholesky factor of H^-1: row i holds how column i's error spreads to columns > i
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T.astype(np.float32)
    top = 2**spec.bits - 1
    codes = np.zeros((rows, cols), np.uint8)
    scales = np.zeros((rows, cols // g), np.float32)
    biases = np.zeros((rows, cols // g), np.float32)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err = W[:, i1:i2], np.zeros((rows, i2 - i1), np.float32)
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                s, b = _group_params(W1[:, i : i + g], spec, dtype)
                scales[:, col // g], biases[:, col // g] = s[:, 0], b[:, 0]
            s, b = scales[:, col // g], biases[:, col // g]
            q = np.clip(np.rint((W1[:, i] - b) / np.where(s == 0, 1, s)), 0, top)
            codes[:, col] = q
            err = (W1[:, i] - (s * q + b)) / Hinv[col, col]
            W1[:, i:] -= np.outer(err, Hinv[col, col:i2])
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return {
        "weight": mx.array(pack(codes, spec.bits)),
        "scales": mx.array(scales).astype(dtype),
        "biases": mx.array(biases).astype(dtype),
    }
