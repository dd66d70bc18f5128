"""Mixed precision to a budget: how much quantizing each unit of a model moves its output, and the
per-unit precisions that keep the output closest to float for a given bits per weight.

Units are what a precision is chosen for: the tied embedding (which is also the LM head) and, per
decoder layer, its attention projections and its MLP. A unit's sensitivity to a candidate spec is
the mean KL(float || variant) of the next-token distributions over calibration windows when only
that unit is quantized (fake-quantized in place: weight <- dequantize(quantize(weight)), the
values `mx.quantize` stores, so the same product as the quantized matmul up to float rounding).
The cheapest candidate is measured through the model (the others too, or estimated: `measure`);
what makes that affordable is that the float input of every decoder layer is cached once, so a
layer unit's variants run from that layer onwards (on average half the layers) plus the head.
Only the embedding's variants run the whole model. Calibration windows are text
(`calibration.calibration_set`); image/audio prompts are left out, as the units are text weights.

The allocation models the total KL as the sum of the unit KLs (first order for small independent
perturbations) and spends the budget greedily: starting with every unit at its cheapest
candidate, it repeatedly takes the upgrade with the largest KL reduction per extra byte that still
fits, until none fits. Byte counts are the converter's own (`layout_sizes`), so the budget is met
as `ConversionReport.bits_per_weight` reports it (all stored bytes / parameters).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from gemma_mlx.cache import attention_mask
from gemma_mlx.config import SLIDING
from gemma_mlx.models.gemma import Model
from gemma_mlx.quality import head_log_probs, head_table

from .quantize import QuantSpec, layout_sizes

# Candidate precisions, cheapest first: affine 3-bit g64 (so budgets below 4.5 can be met),
# 4-bit g64 (the default), 4-bit g32, 5-bit (the step mlx-lm's dynamic quant takes), 6-bit, 8-bit.
CANDIDATES = (
    QuantSpec(3, 64),
    QuantSpec(4, 64),
    QuantSpec(4, 32),
    QuantSpec(5, 64),
    QuantSpec(6, 64),
    QuantSpec(8, 64),
)
EMBEDDING = "language_model.embed_tokens"
BINS = 4096  # resolution of the allocation's knapsack (see allocate)
_UNIT = re.compile(r"^(language_model\.layers\.(\d+)\.(self_attn|mlp))\.")
Log = Callable[[str], None]


class BudgetError(ValueError):
    """A --bits-per-weight budget the candidates cannot meet."""


def units_of(paths: Sequence[str]) -> dict[str, list[str]]:
    """Unit name -> its module paths, for the text paths among `paths` (decoder layer attention
    or MLP, the embedding); other paths (vision/audio projections) belong to no unit."""
    out: dict[str, list[str]] = {}
    for p in paths:
        m = _UNIT.match(p)
        if m:
            out.setdefault(m.group(1), []).append(p)
        elif p == EMBEDDING:
            out[p] = [p]
    return out


def short_name(unit: str) -> str:
    """`language_model.layers.3.mlp` -> `3.mlp`, the embedding -> `embed`."""
    m = _UNIT.match(unit + ".")
    return f"{m.group(2)}.{'attn' if m.group(3) == 'self_attn' else 'mlp'}" if m else "embed"


def _module(model: nn.Module, path: str) -> nn.Module:
    m = model
    for part in path.split("."):
        m = m[int(part)] if isinstance(m, list) else m[part]
    return m


def fake_quantize(w: mx.array, spec: QuantSpec) -> mx.array:
    """The values `w` has once quantized with `spec` and read back."""
    q = mx.quantize(w, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    return mx.dequantize(*q, group_size=spec.group_size, bits=spec.bits, mode=spec.mode).astype(w.dtype)


def _kl(ref: np.ndarray, var: np.ndarray) -> float:
    return float((np.exp(ref) * (ref - var)).sum(-1).mean())


def weight_error(w: mx.array, spec: QuantSpec) -> float:
    """Squared error of `w` quantized with `spec` (summed)."""
    return float(mx.sum(mx.square(fake_quantize(w, spec) - w)).item())


@dataclass
class Sensitivity:
    """KL of each unit quantized alone at each candidate, on `tokens` calibration tokens;
    `measured` holds the (unit, spec) pairs run through the model, the rest are estimated."""

    kl: dict[str, dict[QuantSpec, float]]
    tokens: int
    measured: set[tuple[str, QuantSpec]]
    seconds: float = 0.0


def measure(
    model: Model,
    windows: Sequence[Sequence[int]],
    units: Mapping[str, Sequence[str]],
    candidates: Sequence[QuantSpec] = CANDIDATES,
    direct: bool = True,
    log: Log | None = None,
) -> Sensitivity:
    """Mean output KL against float when only one unit is quantized, for every unit and
    candidate (a candidate whose group size does not divide a unit's input width is left out).

    With `direct` every candidate is run through the model (what `convert --bits-per-weight`
    does). Without it only the cheapest is, and the others are estimated as KL(cheapest) x (the
    unit's squared weight error at that spec / at the cheapest), dividing the cost by the number
    of candidates: KL is second order in a small perturbation, whose size the squared weight
    error tracks. On the tiny test model the estimate is within 2x of the measured KL for units
    whose cheapest-candidate KL is below 0.05 nats, but where that KL is large (0.3: 4-bit is past
    the quadratic regime) it underestimates the costlier candidates by up to 5x
    (tests/test_sensitivity.py; the Gemma 3 270M benchmark shows it there). `model` must be
    float; its weights are restored after each variant."""
    start = time.perf_counter()
    tm = model.language_model
    types = tm.config.layer_types
    ids = [mx.array([list(w)]) for w in windows]
    masks = [
        {
            t: attention_mask(None, len(w), tm.config.sliding_window if t == SLIDING else None)
            for t in set(types)
        }
        for w in windows
    ]
    table = head_table(model)

    def run(h: mx.array, first: int, mask: dict) -> mx.array:
        for layer, t in zip(tm.layers[first:], types[first:], strict=True):
            h, _ = layer(h, mask[t])
        return tm.norm(h)

    def log_probs(finals: list[mx.array], embedding: bool) -> np.ndarray:
        hidden = np.concatenate([np.array(f[0].astype(mx.float32)) for f in finals])
        return head_log_probs(model, hidden, None if embedding else table)

    # the float reference, caching every layer's input
    inputs: list[list[mx.array]] = []  # [window][layer]
    finals = []
    for x, mask in zip(ids, masks, strict=True):
        h, per_layer = tm.embed(x), []
        for layer, t in zip(tm.layers, types, strict=True):
            per_layer.append(h)
            h, _ = layer(h, mask[t])
        h = tm.norm(h)
        mx.eval(h, *per_layer)
        inputs.append(per_layer)
        finals.append(h)
    reference = log_probs(finals, False)

    kl: dict[str, dict[QuantSpec, float]] = {}
    measured: set[tuple[str, QuantSpec]] = set()
    for unit, paths in units.items():
        modules = [_module(model, p) for p in paths]
        saved = [m.weight for m in modules]
        m = _UNIT.match(unit + ".")
        first = int(m.group(2)) if m else 0
        specs = [s for s in candidates if not any(w.shape[-1] % s.group_size for w in saved)]
        kl[unit] = {}
        for i, spec in enumerate(specs):
            if i and not direct:
                err = sum(weight_error(w, spec) for w in saved) / sum(
                    weight_error(w, specs[0]) for w in saved
                )
                kl[unit][spec] = kl[unit][specs[0]] * err
                continue
            for mod, w in zip(modules, saved, strict=True):
                mod.weight = fake_quantize(w, spec)
            try:
                finals = [
                    run(inputs[j][first] if m else tm.embed(x), first, mask)
                    for j, (x, mask) in enumerate(zip(ids, masks, strict=True))
                ]
                kl[unit][spec] = _kl(reference, log_probs(finals, m is None))
                measured.add((unit, spec))
            finally:
                for mod, w in zip(modules, saved, strict=True):
                    mod.weight = w
        if log:
            log(
                f"{short_name(unit)}: "
                + ", ".join(f"{s.bits}b g{s.group_size} {v:.4g}" for s, v in kl[unit].items())
            )
    return Sensitivity(kl, sum(len(w) for w in windows), measured, time.perf_counter() - start)


@dataclass
class Allocation:
    """The chosen spec of every unit, the layout it gives, and what the converter will report."""

    choice: dict[str, QuantSpec]
    layout: dict[str, QuantSpec | None]
    budget: float
    bits_per_weight: float
    predicted_kl: float  # sum of the chosen units' KLs

    def table(self) -> list[tuple[str, str]]:
        """(spec, units) rows, e.g. ("affine 8-bit, group 64", "embed; mlp 0-3, 17"): compact."""
        by_spec: dict[QuantSpec, list[str]] = {}
        for unit, spec in self.choice.items():
            by_spec.setdefault(spec, []).append(short_name(unit))
        rows = []
        for spec in sorted(by_spec, key=lambda s: (s.bits, -s.group_size)):
            names = by_spec[spec]
            parts = ["embed"] if "embed" in names else []
            for kind in ("attn", "mlp"):
                layers = sorted(int(n.split(".")[0]) for n in names if n.endswith("." + kind))
                if layers:
                    parts.append(f"{kind} {_ranges(layers)}")
            rows.append((str(spec), "; ".join(parts)))
        return rows


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def allocate(
    model: nn.Module,
    base: Mapping[str, QuantSpec | None],
    kl: Mapping[str, Mapping[QuantSpec, float]],
    units: Mapping[str, Sequence[str]],
    budget: float,
    float_bytes: int | Mapping[str, int] = 2,
) -> Allocation:
    """Per-unit specs within `budget` bits per weight (all stored bytes / parameters, as the
    converter reports it) with the least summed KL (each unit's measured KL taken as additive).
    `base` is the layout of everything else (paths outside the units keep their spec);
    `float_bytes` as for `layout_sizes`: the float element size of the output, one for all or per
    parameter.

    The result lies below the budget by what no combination of the candidates can fill, plus up
    to one bin per unit (`BINS` bins span the budget above the cheapest layout): within 0.05 bits
    on real models, whose layer units are each about 1% of the weights (the 270M, the 12B); a
    tiny model whose units are 10% each can end further below."""
    params = dict(tree_flatten(model.parameters()))
    count = sum(p.size for p in params.values())
    if not isinstance(budget, int | float) or not math.isfinite(budget):
        raise BudgetError(f"--bits-per-weight {budget!r}: expected a finite number, e.g. 4.5")
    float_bpw = 8 * sum(layout_sizes(model, {}, float_bytes).values()) / count
    if budget >= float_bpw:
        raise BudgetError(
            f"--bits-per-weight {budget}: at or above the float checkpoint's {float_bpw:.2f}; "
            "convert with --no-quantize instead"
        )
    specs = sorted({s for c in kl.values() for s in c}, key=lambda s: s.bits_per_weight())
    sizes = {s: layout_sizes(model, {p: s for ps in units.values() for p in ps}, float_bytes) for s in specs}
    cost = {u: {s: sum(sizes[s][f"{p}.weight"] for p in ps) for s in kl[u]} for u, ps in units.items()}
    fixed_layout = {p: s for p, s in base.items() if not any(p in ps for ps in units.values())}
    fixed_sizes = layout_sizes(model, fixed_layout, float_bytes)
    unit_weights = {f"{p}.weight" for ps in units.values() for p in ps}
    fixed = sum(v for k, v in fixed_sizes.items() if k not in unit_weights)
    target = budget * count / 8
    choice = {u: min(c, key=c.get) for u, c in cost.items()}
    lowest = fixed + sum(cost[u][s] for u, s in choice.items())
    highest = fixed + sum(max(c.values()) for c in cost.values())
    if lowest > target:
        raise BudgetError(
            f"--bits-per-weight {budget}: below the cheapest layout ({8 * lowest / count:.3f}, every unit at "
            f"{min(specs, key=lambda s: s.bits_per_weight())}); expected at least that"
        )
    if highest + count * 0.05 / 8 < target:
        raise BudgetError(
            f"--bits-per-weight {budget}: above what the candidates reach ({8 * highest / count:.3f}, every "
            f"unit at {max(specs, key=lambda s: s.bits_per_weight())}); use --bits 8 or --no-quantize"
        )
    # Multiple-choice knapsack on the bytes above the cheapest layout, in BINS steps rounded up
    # (so the result never exceeds the budget): the least summed KL that fits. Greedy by KL per
    # byte can stop well short of the budget once every open upgrade is too big for what is left.
    names = list(cost)
    step = max((target - lowest) / BINS, 1e-9)
    spend = {u: {s: math.ceil((b - cost[u][choice[u]]) / step) for s, b in cost[u].items()} for u in names}
    best = np.zeros(BINS + 1)  # least KL of the units so far within k bins
    picks = []
    for u in names:
        options = [(s, e) for s, e in spend[u].items() if e <= BINS]
        table = np.full((len(options), BINS + 1), np.inf)
        for i, (s, e) in enumerate(options):
            table[i, e:] = best[: BINS + 1 - e] + kl[u][s]
        picks.append((options, table.argmin(0)))
        best = table.min(0)
    k = BINS
    for u, (options, arg) in zip(reversed(names), reversed(picks), strict=True):
        s, e = options[arg[k]]
        choice[u], k = s, k - e
    spent = fixed + sum(cost[u][s] for u, s in choice.items())
    layout = dict(base)
    for u, ps in units.items():
        layout.update({p: choice[u] for p in ps})
    return Allocation(
        choice=choice,
        layout=layout,
        budget=budget,
        bits_per_weight=8 * spent / count,
        predicted_kl=sum(kl[u][s] for u, s in choice.items()),
    )


def plan_json(alloc: Allocation, sens: Sensitivity, calibration: str) -> dict:
    """What `quantization_plan.json` records: the budget, the result, and every unit's choice
    and measured KLs."""
    return {
        "bits_per_weight_budget": alloc.budget,
        "bits_per_weight": round(alloc.bits_per_weight, 4),
        "predicted_kl_sum": alloc.predicted_kl,
        "calibration": calibration,
        "calibration_tokens": sens.tokens,
        "units": {
            u: {
                "spec": s.as_dict(),
                "kl": {_key(c): v for c, v in sens.kl[u].items()},
                "measured": [_key(c) for c in sens.kl[u] if (u, c) in sens.measured],
            }
            for u, s in alloc.choice.items()
        },
    }


def _key(spec: QuantSpec) -> str:
    return f"{spec.mode}{spec.bits}g{spec.group_size}"
