"""Quality of quantized variants of the offline default model (Gemma 3 270M) on public-domain text.

    python benchmarks/quant_quality.py [--tokens N] [--out benchmarks/results/quant_quality_gemma3_270m.md]

Variants are made from the float32 checkpoint the way the converter makes them (MLX affine
quantization of every Linear and of the tied embedding); the head runs in numpy (see
gemma_mlx.quality). The float32 model is the reference for top-1 agreement and KL.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx import load
from gemma_mlx.checkpoint import load_model
from gemma_mlx.default_model import default_model_path
from gemma_mlx.quality import compare, log_probs

TEXT = Path(__file__).parents[1] / "tests" / "data" / "public_domain.txt"
VARIANTS = {  # name -> (dtype, quantization (group_size, bits) or None)
    "float32 (reference)": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "8-bit g64": ("float32", (64, 8)),
    "6-bit g64": ("float32", (64, 6)),
    "4-bit g64": ("float32", (64, 4)),
    "4-bit g32": ("float32", (32, 4)),
}


def variant(path: Path, dtype: str, quant: tuple[int, int] | None):
    model = load_model(path, dtype=dtype)
    if quant is not None:
        nn.quantize(model, *quant)
        mx.eval(model.parameters())
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=0, help="use the first N tokens (0 = all)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    path = default_model_path()
    model, processor = load(path)
    ids = processor.encode_prompt(TEXT.read_text())
    ids = ids[: args.tokens] if args.tokens else ids
    reference = log_probs(model, ids)
    rows = []
    for name, (dtype, quant) in VARIANTS.items():
        t = time.perf_counter()
        q = compare(reference, log_probs(variant(path, dtype, quant), ids), ids)
        rows.append(f"| {name} | {q.perplexity:.3f} | {q.top1_agreement:.3f} | {q.mean_kl:.4f} |")
        print(rows[-1], f"({time.perf_counter() - t:.0f} s)", flush=True)
    table = "\n".join(
        [
            f"Gemma 3 270M (from the Q4_K_M/Q5_0/Q6_K GGUF, dequantized to float32), {len(ids)} tokens of "
            f"tests/data/public_domain.txt; MLX {mx.__version__}, {platform.machine()} CPU.",
            "",
            "| variant | perplexity | top-1 agreement | mean KL (nats) |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
