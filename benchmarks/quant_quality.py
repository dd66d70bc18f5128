"""Quality of our conversions of the offline default model (Gemma 3 270M) on public-domain text.

    python benchmarks/quant_quality.py [--tokens N] [--out benchmarks/results/quant_quality_gemma3_270m.md]

Every variant is made by the converter (`gemma_mlx.convert.convert`) from the float32 checkpoint
imported from the GGUF, exactly as `gemma-mlx convert` makes it; quantized variants keep float32
scales and activations, so their rows show the weight quantization alone. The float32 model is
the reference for top-1 agreement and KL; the head runs in numpy (see gemma_mlx.quality).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from gemma_mlx import load
from gemma_mlx.checkpoint import load_model
from gemma_mlx.convert import convert
from gemma_mlx.convert.default_model import default_model_path
from gemma_mlx.quality import compare, log_probs

TEXT = Path(__file__).parents[1] / "tests" / "data" / "public_domain.txt"
# name -> convert() arguments (None: the float32 reference itself)
VARIANTS: dict[str, dict | None] = {
    "float32 (reference)": None,
    "bfloat16": dict(quantize=False, dtype="bfloat16"),
    "8-bit g64": dict(bits=8, group_size=64),
    "6-bit g64": dict(bits=6, group_size=64),
    "4-bit g64": dict(bits=4, group_size=64),
    "4-bit g32": dict(bits=4, group_size=32),
    "4-bit g64, recipe mixed_4_6": dict(bits=4, group_size=64, recipe="mixed_4_6"),
    "4-bit g64, recipe mixed_4_8": dict(bits=4, group_size=64, recipe="mixed_4_8"),
}


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
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kwargs) in enumerate(VARIANTS.items()):
            t = time.perf_counter()
            bpw = 32.0
            if kwargs is None:
                variant = model
            else:
                report = convert(path, Path(tmp) / str(i), **kwargs)
                bpw, variant = report.bits_per_weight, load_model(report.out)
            q = compare(reference, log_probs(variant, ids), ids)
            rows.append(
                f"| {name} | {bpw:.2f} | {q.perplexity:.3f} | {q.top1_agreement:.3f} | {q.mean_kl:.4f} |"
            )
            print(rows[-1], f"({time.perf_counter() - t:.0f} s)", flush=True)
    table = "\n".join(
        [
            f"Gemma 3 270M (the Q4_K_M GGUF from PyPI, dequantized to float32), {len(ids)} tokens of "
            f"tests/data/public_domain.txt; variants made by `gemma_mlx.convert.convert` (quantized ones "
            f"with float32 scales and activations); MLX {mx.__version__}, {platform.machine()} CPU. "
            "Bits per weight: all stored bytes / parameters (the tied embedding is 63% of them).",
            "",
            "| variant | bits/weight | perplexity | top-1 agreement | mean KL (nats) |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
