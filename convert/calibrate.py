"""Calibrated quantization, one decoder layer at a time: AWQ (activation-aware scales) and GPTQ
(error compensation through the calibration Hessian).

The calibration prompts are embedded once; then each layer is loaded (lazily, from the source
files, in float32), calibrated, quantized as the layout says, and run on the hidden states to give
the next layer its inputs, which therefore carry the quantization error of every layer before it
(as in inference). Memory holds the hidden states of the calibration set, one layer and its
captured activations; each layer's results go to a scratch safetensors file and are read back
lazily by the writer.

Where the AWQ scales `s` go (exact before quantization: `x W^T = (x / s)(W s)^T`):
- q/k/v (and a k_eq_v layer's K, which is also V): divided out of `input_layernorm`, whose weight
  becomes `(1 + w) / s - 1` for Gemma 3's `x (1 + w)` norm and `w / s` for Gemma 4's `x w`.
- gate/up: the same with `pre_feedforward_layernorm`.
- down_proj: divided out of up_proj's output rows (`gelu(gate x) * (up x)` is linear in up x).
- o_proj: not scaled. Its input is the attention's weighted sum of V; on Gemma 4 V goes through a
  weightless RMSNorm (no weight to fold into, and the norm is not linear) and full layers take V
  from K, so no exact fold exists; on Gemma 3 a fold into v_proj's rows would be exact but is not
  done yet. o_proj gets RTN under `awq`.
The embedding / LM head (tied) and the vision/audio projections have no calibrated method here:
they are quantized by the writer with RTN, as `plan` says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from gemma_mlx.cache import attention_mask
from gemma_mlx.config import SLIDING
from gemma_mlx.models.gemma import DecoderLayer, Model, RMSNorm
from gemma_mlx.processor import Inputs

from .gptq import gptq_quantize
from .quantize import QuantSpec, quantize_weight

METHODS = ("rtn", "awq", "gptq")
AWQ_GRID = 20  # alphas 0, 1/20, ..., 19/20 (0: s = 1, plain RTN, so never worse on calibration)
AWQ_FLOOR = 0.1  # the smallest channel statistic, as a fraction of the mean (see _search_scales)


@dataclass
class CalibrationReport:
    method: str
    samples: int
    tokens: int
    seconds: float = 0.0
    layer_seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0  # MLX peak memory during calibration
    skipped: dict[str, str] = field(default_factory=dict)  # module path -> why not calibrated


@dataclass
class _Batch:
    """Calibration prompts of one shape: hidden states `[B, L, dim]` and each layer type's mask."""

    h: mx.array
    masks: dict[str, object]


def _batches(model: Model, samples: list[Inputs]) -> list[_Batch]:
    """Embed the prompts (media through the model's own embedders) and group text prompts of equal
    length into one batch; prompts with media go one by one (image blocks have their own masks)."""
    cfg, lm = model.config.text, model.language_model
    groups: dict[int, list[list[int]]] = {}
    out = []
    for s in samples:
        if s.has_media:
            h, block_ids = model.embed_inputs(mx.array([s.ids]), **s.model_kwargs())
            out.append((h, block_ids))
        else:
            groups.setdefault(len(s.ids), []).append(s.ids)
    out += [(lm.embed(mx.array(ids)), None) for ids in groups.values()]
    batches = []
    for h, block_ids in out:
        n = h.shape[1]
        masks = {
            t: attention_mask(
                None, n, cfg.sliding_window if t == SLIDING else None, block_ids if t == SLIDING else None
            )
            for t in set(cfg.layer_types)
        }
        h = h.astype(mx.float32)
        mx.eval(h)
        batches.append(_Batch(h, masks))
    return batches


def fake_quantize(w: mx.array, spec: QuantSpec, dtype: mx.Dtype) -> mx.array:
    """`w` as the writer will store it (`quantize_weight` in `dtype`), dequantized to float32."""
    q = quantize_weight(w, spec, dtype)
    return mx.dequantize(
        q["weight"], q["scales"], q.get("biases"), spec.group_size, spec.bits, mode=spec.mode
    ).astype(mx.float32)


# Statistics, errors and Hessians leave out each prompt's first position (BOS): Gemma's attention
# sink carries activations orders of magnitude above the rest, and would otherwise decide the
# scales and the Hessian alone. Its keys and values still count through the other positions'
# attention outputs.
def _flat(xs: list[mx.array]) -> mx.array:
    return mx.concatenate([x[:, 1:].reshape(-1, x.shape[-1]) for x in xs])


def _error(out: list[mx.array], ref: list[mx.array]) -> float:
    return sum(float(mx.sum(mx.square(o[:, 1:] - r[:, 1:]))) for o, r in zip(out, ref, strict=True))


def _hessian(xs: list[mx.array]) -> np.ndarray:
    """`sum X^T X` over the calibration tokens, float64 (numpy: see `_HostLinear`)."""
    h = 0
    for x in xs:
        x = np.array(x[:, 1:].reshape(-1, x.shape[-1]), dtype=np.float32)
        h = h + (x.T @ x).astype(np.float64)
    return h


class _HostLinear(nn.Module):
    """A bias-free Linear whose product numpy computes. On the CPU backend MLX's matmul is far
    slower than numpy's BLAS (measured 30x on a 512x640 @ 640x2048 product), and calibration is
    mostly such products; elsewhere (Metal, CUDA) the layers keep MLX's own Linear."""

    def __init__(self, weight: mx.array):
        super().__init__()
        self.weight = weight

    def __call__(self, x: mx.array) -> mx.array:
        w = np.array(self.weight, dtype=np.float32, copy=False)
        return mx.array(np.array(x, dtype=np.float32, copy=False) @ w.T)


class _Tap(nn.Module):
    """Stands in for a Linear and records its inputs."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[mx.array] = []

    def __call__(self, x: mx.array) -> mx.array:
        self.seen.append(x)
        return self.inner(x)


def _inputs_of(parent: nn.Module, name: str, run: Callable[[], object]) -> list[mx.array]:
    """What `parent.name` receives while `run()` runs."""
    tap = _Tap(getattr(parent, name))
    setattr(parent, name, tap)
    try:
        run()
        mx.eval(tap.seen)
        return list(tap.seen)
    finally:
        setattr(parent, name, tap.inner)


class _Layer:
    """One decoder layer under calibration: its float32 weights, its layout and stored dtypes."""

    def __init__(
        self,
        layer: DecoderLayer,
        prefix: str,
        layout: Mapping[str, QuantSpec | None],
        dtype_of: Callable[[str], mx.Dtype],
    ):
        self.layer, self.prefix, self.layout, self.dtype_of = layer, prefix, layout, dtype_of
        layer.update(tree_map(lambda a: a.astype(mx.float32), layer.parameters()))
        mx.eval(layer.parameters())
        attn, mlp = layer.self_attn, layer.mlp
        if mx.default_device() == mx.cpu:
            for parent, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, tuple(mlp))):
                for n in names:
                    if n in parent:
                        setattr(parent, n, _HostLinear(getattr(parent, n).weight))
        self.qkv = [(f"self_attn.{n}", getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj") if n in attn]
        self.gate_up = [("mlp.gate_proj", mlp.gate_proj), ("mlp.up_proj", mlp.up_proj)]

    def spec(self, name: str) -> QuantSpec | None:
        return self.layout.get(f"{self.prefix}.{name}")

    def dtype(self, name: str) -> mx.Dtype:
        return self.dtype_of(f"{self.prefix}.{name}.weight")

    def fake(self, name: str, w: mx.array) -> mx.array:
        spec = self.spec(name)
        return w if spec is None else fake_quantize(w, spec, self.dtype(name))

    def run(self, batches: list[_Batch], t: str) -> list[mx.array]:
        return [self.layer(b.h, b.masks[t])[0] for b in batches]

    def attn_inputs(self, batches: list[_Batch]) -> list[mx.array]:
        return [self.layer.input_layernorm(b.h) for b in batches]

    def mlp_inputs(self, batches: list[_Batch], t: str) -> list[mx.array]:
        layer = self.layer
        return [
            layer.pre_feedforward_layernorm(
                b.h + layer.post_attention_layernorm(layer.self_attn(x, b.masks[t])[0])
            )
            for b, x in zip(batches, self.attn_inputs(batches), strict=True)
        ]


def _search_scales(
    L: _Layer, linears: list[tuple[str, nn.Linear]], xs: list[mx.array], run: Callable[[], list[mx.array]]
) -> mx.array:
    """AWQ: the per-input-channel scale `s = mean|x|^alpha` (normalized) whose quantized `W s`
    (with `x / s`) gives the smallest error of `run()`'s output, alpha over a grid.

    The statistic is floored at `AWQ_FLOOR` of its mean: a channel (nearly) silent on the
    calibration text would otherwise get a tiny scale, its weights would round to nothing, and
    text that does use it would see the error multiplied by 1/s."""
    stat = mx.mean(mx.abs(_flat(xs)), axis=0)
    stat = mx.maximum(stat, AWQ_FLOOR * mx.mean(stat))
    ref = run()
    mx.eval(ref)
    originals = [m.weight for _, m in linears]
    best, best_s = float("inf"), mx.ones_like(stat)
    for alpha in np.arange(AWQ_GRID) / AWQ_GRID:
        s = stat ** float(alpha)
        s = s / mx.sqrt(s.max() * s.min())
        for (name, m), w in zip(linears, originals, strict=True):
            m.weight = L.fake(name, w * s) / s
        err = _error(run(), ref)
        if err < best:
            best, best_s = err, s
    for (_, m), w in zip(linears, originals, strict=True):
        m.weight = w
    return best_s


def _fold_norm(norm: RMSNorm, s: mx.array) -> None:
    """`norm(x) / s`: Gemma 3 norms scale by `1 + w`, Gemma 4 norms by `w`."""
    norm.weight = (norm.weight + norm.offset) / s - norm.offset


def _awq(L: _Layer, batches: list[_Batch], t: str) -> None:
    layer = L.layer
    xs = L.attn_inputs(batches)
    # Errors are measured on what each block adds to the residual stream, after Gemma's post-norm:
    # the norm rescales every token's output to unit RMS, so a token with a small output weighs as
    # much as one with a large output there.
    post_attn, post_mlp = layer.post_attention_layernorm, layer.post_feedforward_layernorm
    if any(L.spec(n) for n, _ in L.qkv):
        run = lambda: [  # noqa: E731
            post_attn(layer.self_attn(x, b.masks[t])[0]) for x, b in zip(xs, batches, strict=True)
        ]
        s = _search_scales(L, L.qkv, xs, run)
        _fold_norm(layer.input_layernorm, s)
        for _, m in L.qkv:
            m.weight = m.weight * s
    xs = L.mlp_inputs(batches, t)
    mx.eval(xs)
    mlp = layer.mlp
    if any(L.spec(n) for n, _ in L.gate_up):
        s = _search_scales(L, L.gate_up, xs, lambda: [post_mlp(mlp(x)) for x in xs])
        _fold_norm(layer.pre_feedforward_layernorm, s)
        for _, m in L.gate_up:
            m.weight = m.weight * s
    if L.spec("mlp.down_proj"):
        acts = [nn.gelu_approx(mlp.gate_proj(x)) * mlp.up_proj(x) for x in xs]
        mx.eval(acts)
        s = _search_scales(
            L, [("mlp.down_proj", mlp.down_proj)], acts, lambda: [post_mlp(mlp.down_proj(a)) for a in acts]
        )
        mlp.up_proj.weight = mlp.up_proj.weight / s[:, None]
        mlp.down_proj.weight = mlp.down_proj.weight * s


def _gptq(L: _Layer, batches: list[_Batch], t: str) -> dict[str, dict[str, mx.array]]:
    """GPTQ in execution order, each group of Linears calibrated on inputs that already carry the
    quantization of the ones before it. Returns module name -> quantized triple."""
    layer, out = L.layer, {}

    def quantize(group: list[tuple[str, nn.Linear]], xs: list[mx.array]) -> None:
        group = [(n, m) for n, m in group if L.spec(n) is not None]
        if not group:
            return
        H = _hessian(xs)
        # Linears that share an input and a spec go as one stacked weight (rows are independent)
        by_spec: dict[tuple, list[tuple[str, nn.Linear]]] = {}
        for name, m in group:
            by_spec.setdefault((L.spec(name), L.dtype(name)), []).append((name, m))
        for (spec, dtype), same in by_spec.items():
            stacked = gptq_quantize(mx.concatenate([m.weight for _, m in same]), H, spec, dtype)
            start = 0
            for name, m in same:
                rows = m.weight.shape[0]
                q = {k: v[start : start + rows] for k, v in stacked.items()}
                start += rows
                out[name] = q
                m.weight = mx.dequantize(
                    q["weight"], q["scales"], q["biases"], spec.group_size, spec.bits
                ).astype(mx.float32)

    attn, mlp = layer.self_attn, layer.mlp
    quantize(L.qkv, L.attn_inputs(batches))
    xs = L.attn_inputs(batches)
    run = lambda: [attn(x, b.masks[t]) for x, b in zip(xs, batches, strict=True)]  # noqa: E731
    quantize([("self_attn.o_proj", attn.o_proj)], _inputs_of(attn, "o_proj", run))
    xs = L.mlp_inputs(batches, t)
    mx.eval(xs)
    quantize(L.gate_up, xs)
    acts = _inputs_of(mlp, "down_proj", lambda: [mlp(x) for x in xs])
    quantize([("mlp.down_proj", mlp.down_proj)], acts)
    return out


def calibrate(
    model: Model,
    layout: Mapping[str, QuantSpec | None],
    method: str,
    samples: list[Inputs],
    scratch: Path,
    dtype_of: Callable[[str], mx.Dtype],
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, mx.array], set[str], CalibrationReport]:
    """Calibrate the decoder layers of `model` (weights loaded lazily; each layer is released when
    done) with `method` ("awq" or "gptq") on `samples`, quantizing as `layout` says (module path ->
    spec, None: float). `dtype_of(parameter name)`: the dtype the writer stores it in.

    Returns (parameter name -> replacement tensor, read lazily from `scratch`; the module paths
    whose replacement is already quantized (weight, scales, biases), the report). Under `awq` the
    replacements are float (scaled Linears, folded norms; the writer quantizes them with RTN as
    planned); under `gptq` every planned decoder Linear comes quantized."""
    if method not in ("awq", "gptq"):
        raise ValueError(f"--method {method!r}: calibration runs for awq or gptq")
    report = CalibrationReport(method, len(samples), sum(len(s.ids) for s in samples))
    start = time.perf_counter()
    mx.reset_peak_memory()
    cfg = model.config.text
    batches = _batches(model, samples)
    packed: set[str] = set()
    files = []
    for i, layer in enumerate(model.layers):
        t0, t = time.perf_counter(), cfg.layer_types[i]
        prefix = f"language_model.layers.{i}"
        L = _Layer(layer, prefix, layout, dtype_of)
        before = dict(tree_flatten(layer.parameters()))
        triples = _awq(L, batches, t) if method == "awq" else _gptq(L, batches, t)
        saved: dict[str, mx.array] = {}
        for name, q in (triples or {}).items():
            packed.add(f"{prefix}.{name}")
            saved.update({f"{prefix}.{name}.{k}": v for k, v in q.items()})
        for name, p in tree_flatten(layer.parameters()):
            full = f"{prefix}.{name}"
            if p is not before[name] and full.removesuffix(".weight") not in packed:
                saved[full] = p.astype(dtype_of(full))  # AWQ's scaled Linears and folded norms
        if method == "awq":  # propagate through the layer as the writer will store it
            for name, m in [*L.qkv, ("self_attn.o_proj", layer.self_attn.o_proj), *L.gate_up]:
                m.weight = L.fake(name, m.weight)
            layer.mlp.down_proj.weight = L.fake("mlp.down_proj", layer.mlp.down_proj.weight)
        for b in batches:
            b.h = layer(b.h, b.masks[t])[0]
        mx.eval([b.h for b in batches])
        if saved:
            f = scratch / f"layer{i:04d}.safetensors"
            mx.save_safetensors(str(f), saved)
            files.append(f)
        model.language_model.layers[i] = nn.Module()  # release this layer's weights
        del L, layer, before, saved, triples
        report.layer_seconds.append(time.perf_counter() - t0)
        if log:
            log(f"calibrated layer {i + 1}/{len(model.layers)} ({report.layer_seconds[-1]:.1f} s)")
    replacements: dict[str, mx.array] = {}
    for f in files:
        replacements.update(mx.load(str(f)))
    for path, spec in layout.items():
        if spec is not None and ".layers." not in path:
            report.skipped[path] = "RTN (no calibrated method outside the decoder layers)"
    if method == "awq":
        for path, spec in layout.items():
            if spec is not None and path.endswith("self_attn.o_proj"):
                report.skipped[path] = "RTN (no exact fold for o_proj's input scales)"
    report.seconds = time.perf_counter() - start
    report.peak_bytes = mx.get_peak_memory()
    return replacements, packed, report
