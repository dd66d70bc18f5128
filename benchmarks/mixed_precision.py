"""Mixed precision to a budget on the offline default model (Gemma 3 270M, float32), against
uniform 4-bit and the 8-bit-MLP layout, with the 12B's bits per weight and bytes per token.

    python benchmarks/mixed_precision.py [--tokens 128] [--samples 1] [--length 32] \\
        [--out benchmarks/results/mixed_precision_gemma3_270m.md]

Every variant is made by the converter (`gemma_mlx.convert.convert`, bfloat16 scales and float
parts as a 12B conversion ships them) and read back with float32 activations, so the rows show the
weight quantization alone. The sensitivity is measured once on the builtin calibration text
(`convert/calibration.py`, Python stdlib docs and code) and reused for every budget; quality is
measured on the held-out KJV Genesis (benchmarks/data/genesis_kjv.txt), which is not in the
calibration set. For the 12B columns each unit's choice is carried over by relative depth: layer j
of the 12B's 48 takes the spec of layer floor(j * 18 / 48) of the 270M (same unit type), the
embedding its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from gemma_mlx import load
from gemma_mlx.checkpoint import load_model
from gemma_mlx.convert import QuantSpec, calibrate, convert, estimate, plan
from gemma_mlx.convert.calibration import calibration_set
from gemma_mlx.convert.default_model import default_model_path
from gemma_mlx.convert.sensitivity import CANDIDATES, Sensitivity, measure, short_name, units_of
from gemma_mlx.quality import compare, log_probs

ROOT = Path(__file__).parents[1]
HELD_OUT = ROOT / "benchmarks" / "data" / "genesis_kjv.txt"
CONFIG_12B = ROOT / "tests" / "data" / "gemma-4-12b-config.json"
LAYERS_12B = 48
VARIANTS: dict[str, dict | None] = {
    "float32 (reference)": None,
    "uniform 4-bit g64 (default)": dict(bits=4),
    "mlp_8bit (mlx-community 12B '4bit')": dict(bits=4, recipe="mlp_8bit"),
    "budget 4.6 bpw": dict(bits_per_weight=4.6),
    "budget 5.0 bpw": dict(bits_per_weight=5.0),
    "budget 5.56 bpw (mlp_8bit's size on the 270M)": dict(bits_per_weight=5.56),
    "budget 6.0 bpw": dict(bits_per_weight=6.0),
    "uniform 6-bit g64": dict(bits=6),
    # calibrated: AWQ on a small set (4 x 128 builtin tokens) to keep this CPU's run short
    "AWQ 4-bit g64": dict(bits=4, method="awq", calibration_samples=4, calibration_length=128),
    "budget 4.75 bpw (mlx-lm dynamic quant's size)": dict(bits_per_weight=4.75),
    "budget 4.6 bpw + AWQ": dict(
        bits_per_weight=4.6, method="awq", calibration_samples=4, calibration_length=128
    ),
    "budget 4.75 bpw + AWQ": dict(
        bits_per_weight=4.75, method="awq", calibration_samples=4, calibration_length=128
    ),
}


def overrides_12b(plan_file: Path, layers: int) -> dict[str, QuantSpec]:
    """The 270M's per-unit choice as 12B overrides: by relative depth, same unit type."""
    units = json.loads(plan_file.read_text())["units"]
    out: dict[str, QuantSpec] = {}
    for unit, entry in units.items():
        spec = QuantSpec(**entry["spec"])
        m = re.match(r"language_model\.layers\.(\d+)\.(self_attn|mlp)$", unit)
        if m is None:
            out[r"^language_model\.embed_tokens$"] = spec
            continue
        for j in range(LAYERS_12B):
            if j * layers // LAYERS_12B == int(m.group(1)):
                out[rf"^language_model\.layers\.{j}\.{m.group(2)}\."] = spec
    return out


def measure_with_check(model, windows, units, layers) -> tuple[Sensitivity, list[str]]:
    """The sensitivity (cheapest candidate measured, the others estimated) and table rows that
    compare the estimate with a direct measurement on the last layers' units (the cheapest to
    run from, on a loaded 2-core machine)."""
    t = time.perf_counter()
    sens = measure(model, windows, units, direct=False, log=lambda line: print(line, flush=True))
    print(
        f"sensitivity: {len(units)} units, {sens.tokens} tokens, {time.perf_counter() - t:.0f} s", flush=True
    )
    probe = [
        u
        for u in units
        if u.endswith((f".{layers - 2}.mlp", f".{layers - 1}.self_attn", f".{layers - 1}.mlp"))
    ]
    direct = measure(model, windows, {u: units[u] for u in probe})
    check = [
        f"| {short_name(u)} | {s} | {direct.kl[u][s]:.4g} | {sens.kl[u][s]:.4g} |"
        for u in probe
        for s in direct.kl[u]
        if s != CANDIDATES[0]
    ]
    return sens, check


def save_sensitivity(path: Path, sens: Sensitivity, check: list[str]) -> None:
    kl = {u: [[s.as_dict(), v] for s, v in c.items()] for u, c in sens.kl.items()}
    measured = [[u, s.as_dict()] for u, s in sens.measured]
    path.write_text(json.dumps(dict(kl=kl, tokens=sens.tokens, measured=measured, check=check)))


def load_sensitivity(path: Path) -> tuple[Sensitivity, list[str]]:
    d = json.loads(path.read_text())
    kl = {u: {QuantSpec(**s): v for s, v in c} for u, c in d["kl"].items()}
    return Sensitivity(kl, d["tokens"], {(u, QuantSpec(**s)) for u, s in d["measured"]}), d["check"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128, help="held-out tokens measured")
    ap.add_argument("--samples", type=int, default=1, help="calibration windows for the sensitivity")
    ap.add_argument("--length", type=int, default=32, help="tokens per calibration window")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the rows")
    ap.add_argument("--sensitivity", type=Path, default=None, help="JSON cache of the measurement")
    ap.add_argument("--awq-grid", type=int, default=8, help="alphas AWQ tries per scale search")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    calibrate.AWQ_GRID = args.awq_grid
    chosen = args.variants.split(",")
    load_before = os.getloadavg()
    path = default_model_path()
    model, processor = load(path)
    layers = len(model.layers)
    windows = [c.ids for c in calibration_set(processor, "builtin", args.samples, args.length)]
    base = plan(model, CANDIDATES[0])
    units = units_of([p for p, s in base.items() if s is not None])
    sens, check = None, []
    if not any("bits_per_weight" in (VARIANTS[n] or {}) for n in chosen):
        pass  # no budget row: nothing to measure
    elif args.sensitivity and args.sensitivity.exists():
        sens, check = load_sensitivity(args.sensitivity)
    else:
        sens, check = measure_with_check(model, windows, units, layers)
        if args.sensitivity:
            save_sensitivity(args.sensitivity, sens, check)
    print("\n".join(check), flush=True)

    ids = processor.encode_text(HELD_OUT.read_text())[: args.tokens]
    reference = log_probs(model, ids)
    rows, plans = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kwargs) in enumerate((n, VARIANTS[n]) for n in chosen):
            t = time.perf_counter()
            if kwargs is None:
                q = compare(reference, reference, ids)
                rows.append(f"| {name} | 32.00 | {q.perplexity:.3f} | 1.000 | 0.0000 | 32.00 | - |")
                print(rows[-1], flush=True)
                continue
            report = convert(
                path, Path(tmp) / str(i), dtype="bfloat16", progress=False, sensitivity=sens, **kwargs
            )
            variant = load_model(report.out, dtype="float32")
            q = compare(reference, log_probs(variant, ids), ids)
            del variant
            if "bits_per_weight" in kwargs:
                est = estimate(
                    CONFIG_12B, overrides=overrides_12b(report.out / "quantization_plan.json", layers)
                )
                plans.append((name, report.allocation))
            else:
                est = estimate(CONFIG_12B, bits=kwargs["bits"], recipe=kwargs.get("recipe"))
            rows.append(
                f"| {name} | {report.bits_per_weight:.2f} | {q.perplexity:.3f} | {q.top1_agreement:.3f} "
                f"| {q.mean_kl:.4f} | {est.bits_per_weight:.2f} | {est.bytes_per_token / 1e9:.2f} |"
            )
            print(rows[-1], f"({time.perf_counter() - t:.0f} s)", flush=True)
    load_after = os.getloadavg()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "?")
    lines = [
        "# Mixed precision to a budget: Gemma 3 270M",
        "",
        " ".join(
            [
                f"Gemma 3 270M (the offline float32 checkpoint, from the Q4_K_M GGUF), {len(ids)} held-out",
                "tokens of benchmarks/data/genesis_kjv.txt; sensitivity on",
                f"{sens.tokens if sens else 0} tokens of the builtin calibration text ({args.samples}",
                f"windows of {args.length}), {len(units)} units (embedding; attention and MLP of each of",
                "18 layers), cheapest candidate measured, the others estimated by the weight-error ratio",
                "(checked below). Variants made by `gemma_mlx.convert.convert` with bfloat16 scales and",
                "float parts (as a 12B conversion ships), read back with float32 activations. 12B columns:",
                "`convert.estimate` on the released Gemma 4 12B config",
                "(tests/data/gemma-4-12b-config.json), bfloat16, budget rows carried over by relative",
                "depth (12B layer j takes 270M layer floor(j*18/48)'s choice per unit type, the",
                f"embedding its own). MLX {mx.__version__}, {platform.machine()} {model_name},",
                f"{os.cpu_count()} cores shared with other jobs; load average {load_before[0]:.1f} at",
                f"start, {load_after[0]:.1f} at end.",
            ]
        ),
        "",
        f"    python benchmarks/mixed_precision.py --tokens {args.tokens} --samples {args.samples} "
        f"--length {args.length} --awq-grid {args.awq_grid} --variants '{args.variants}'",
        "",
        "| variant | bits/weight (270M) | perplexity | top-1 agreement | mean KL (nats) | 12B bits/weight "
        "| 12B GB read per token |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Units per precision chosen by each budget (270M layer indices):",
        "",
    ]
    for name, table in plans:
        lines += [f"- {name}: " + " | ".join(f"{spec}: {units}" for spec, units in table or [])]
    lines += [
        "",
        "The estimate for the costlier candidates (KL(cheapest) x weight-error ratio) against a direct "
        "measurement on the last layers' three units:",
        "",
        "| unit | spec | measured KL | estimated KL |",
        "|---|---|---|---|",
        *check,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
