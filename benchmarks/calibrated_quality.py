"""Calibrated 4-bit (AWQ, GPTQ) against round to nearest on the real Gemma 3 270M, held-out text.

    python benchmarks/calibrated_quality.py [--tokens 512] [--samples 8] [--length 256]
        [--awq-grid 10] [--out benchmarks/results/calibrated_quality_gemma3_270m.md]

Every variant is made by `gemma_mlx.convert.convert` (as `gemma-mlx convert --method ...` makes
it) from the offline default model's float32 checkpoint, calibrated on the builtin set (Python
standard-library docs and code) and measured on the first `--tokens` tokens of
benchmarks/data/genesis_kjv.txt (KJV Genesis, held out: nothing of it is in the calibration set).
Scales, biases and activations stay float32, so the rows show the weight quantization alone; the
bits per weight column is for bfloat16 scales/biases/float parts, the layout as usually shipped.
The float32 model is the reference for top-1 agreement and KL.

On this CPU, MLX's matmul is ~30x slower than numpy's, so the forward passes here (and the
calibration's, `calibrate._HostLinear`) compute every Linear in numpy on the (dequantized) weight:
the same products as `mx.quantized_matmul` up to float summation order.
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from gemma_mlx import load
from gemma_mlx.checkpoint import load_model
from gemma_mlx.config import load_config
from gemma_mlx.convert import ConversionReport, calibrate, convert
from gemma_mlx.convert.default_model import default_model_path
from gemma_mlx.convert.quantize import QuantSpec, layout_bytes, plan
from gemma_mlx.models.gemma import Model
from gemma_mlx.quality import Quality, compare, log_probs

TEXT = Path(__file__).parent / "data" / "genesis_kjv.txt"
CONFIG_12B = Path(__file__).parents[1] / "tests" / "data" / "gemma-4-12b-config.json"
# name -> convert() arguments
VARIANTS: dict[str, dict] = {
    "RTN 4-bit g64": dict(bits=4, group_size=64),
    "GPTQ 4-bit g64": dict(bits=4, group_size=64, method="gptq"),
    "RTN 4-bit g32": dict(bits=4, group_size=32),
    "GPTQ 4-bit g32": dict(bits=4, group_size=32, method="gptq"),
    "AWQ 4-bit g64": dict(bits=4, group_size=64, method="awq"),
    "GPTQ 4-bit g64, embedding 8-bit": dict(
        bits=4, group_size=64, method="gptq", overrides={"embed_tokens": 8}
    ),
    "RTN 6-bit g64": dict(bits=6, group_size=64),
    "GPTQ 6-bit g64": dict(bits=6, group_size=64, method="gptq"),
}


def host_linears(model: Model) -> Model:
    """Every Linear / QuantizedLinear of the decoder as a numpy product on its dequantized weight."""
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not path.startswith("language_model.layers.") or not isinstance(m, nn.Linear | nn.QuantizedLinear):
            continue
        w = m.weight
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, mode=m.mode)
        parent_path, _, name = path.rpartition(".")
        parent = model
        for part in parent_path.split("."):
            parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part)
        setattr(parent, name, calibrate._HostLinear(w.astype(mx.float32)))
    return model


def bpw_bf16(path: Path, kwargs: dict) -> float:
    """Bits per weight of the same layout with bfloat16 scales, biases and float parts."""
    model = Model(load_config(path))
    spec = QuantSpec.make(kwargs.get("bits", 4), kwargs.get("group_size"))
    layout = plan(model, spec, overrides=kwargs.get("overrides"))
    params = sum(p.size for _, p in tree_flatten(model.parameters()))
    return 8 * layout_bytes(model, layout, 2) / params


def convert_and_compare(
    path: Path, out: Path, reference: np.ndarray, ids: list[int], **kwargs
) -> tuple[ConversionReport, Quality, float]:
    """`convert(path, out, **kwargs)`, then the result's quality against `reference` log-probs on
    `ids` (Linears in numpy, `host_linears`), and the conversion's seconds."""
    t = time.perf_counter()
    report = convert(path, out, **kwargs)
    seconds = time.perf_counter() - t
    q = compare(reference, log_probs(host_linears(load_model(report.out)), ids), ids)
    return report, q, seconds


def per_layer_params(config) -> int:
    model = Model(config if not isinstance(config, Path) else load_config(config))
    return sum(p.size for _, p in tree_flatten(model.layers[0].parameters()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--awq-grid", type=int, default=10)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    calibrate.AWQ_GRID = args.awq_grid
    path = default_model_path()
    model, processor = load(path)
    ids = processor.encode_prompt(TEXT.read_text())[: args.tokens]
    reference = log_probs(host_linears(model), ids)
    float_ppl = compare(reference, reference, ids).perplexity
    del model
    layers = load_config(path).text.num_hidden_layers
    scale_12b = per_layer_params(CONFIG_12B) / per_layer_params(path)
    rows, costs = [], []

    def write() -> None:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        table = "\n".join(
            [
                f"Gemma 3 270M (offline default model: the Q4_K_M GGUF from PyPI dequantized to float32), "
                f"{len(ids)} held-out tokens of benchmarks/data/genesis_kjv.txt; calibration: builtin set, "
                f"{args.samples} x {args.length} tokens (Python stdlib docs and code); AWQ grid "
                f"{args.awq_grid} alphas. Variants made by `gemma_mlx.convert.convert` with float32 "
                "scales and activations (so the rows show the weight quantization alone); bits/weight "
                "as shipped with bfloat16 scales, biases and float parts (the tied 262144 x 640 embedding, "
                "also the LM head, is 63% of the parameters and is quantized with RTN by every method). "
                f"MLX {mx.__version__}, {platform.machine()} CPU, 2 shared cores, load: `{uptime}`.",
                "",
                "Command: `python benchmarks/calibrated_quality.py "
                f"--tokens {args.tokens} --samples {args.samples} --length {args.length} "
                f"--awq-grid {args.awq_grid}`",
                "",
                "| variant | bits/weight (bf16) | perplexity | top-1 agreement | mean KL (nats) |",
                "|---|---|---|---|---|",
                f"| float32 (reference) | 32.00 | {float_ppl:.3f} | 1.000 | 0 |",
                *rows,
                "",
                "Conversion cost (this machine; calibration runs the Linears in numpy, see the script). "
                f"12B extrapolation: per-layer time x {scale_12b:.1f} (parameters per decoder layer, "
                "12B / 270M, same calibration tokens) x 48 layers; GPTQ's Hessian inverse grows faster "
                "(cubic in the input width), so its 12B figure is a lower bound.",
                "",
                "| variant | conversion (s) | calibration (s) | per layer (s) | MLX peak (GB) | "
                "process max RSS (GB) | 12B calibration, extrapolated (h) |",
                "|---|---|---|---|---|---|---|",
                *costs,
            ]
        )
        print(table, flush=True)
        if args.out:
            args.out.write_text(table + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kwargs) in enumerate(VARIANTS.items()):
            if args.only and name not in args.only:
                continue
            report, q, seconds = convert_and_compare(
                path,
                Path(tmp) / str(i),
                reference,
                ids,
                progress=False,
                calibration_samples=args.samples,
                calibration_length=args.length,
                **kwargs,
            )
            rows.append(
                f"| {name} | {bpw_bf16(path, kwargs):.2f} | {q.perplexity:.3f} | "
                f"{q.top1_agreement:.3f} | {q.mean_kl:.4f} |"
            )
            c = report.calibration
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            if c is None:
                costs.append(f"| {name} | {seconds:.0f} | - | - | - | {rss:.1f} | - |")
            else:
                per_layer = c.seconds / layers
                costs.append(
                    f"| {name} | {seconds:.0f} | {c.seconds:.0f} | {per_layer:.1f} | "
                    f"{c.peak_bytes / 1e9:.2f} | {rss:.1f} | {per_layer * scale_12b * 48 / 3600:.1f} |"
                )
            print(rows[-1], costs[-1], flush=True)
            write()
            for f in Path(report.out).iterdir():
                f.unlink()


if __name__ == "__main__":
    main()
