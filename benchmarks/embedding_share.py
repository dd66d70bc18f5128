"""How much of 4-bit's loss on Gemma 3 270M is the tied embedding's, and which of its two uses
(input lookup, LM head) it comes from.

    python benchmarks/embedding_share.py [--tokens 512]

Only the 262144 x 640 tied embedding (63% of the model's parameters) is quantized, to affine 4-bit
g64 with MLX's quantizer; every decoder layer stays float32. Three variants against the float32
model on the first `--tokens` tokens of benchmarks/data/genesis_kjv.txt: the quantized table as
the head only, as the input lookup only, and as both (what a 4-bit checkpoint does).
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
from calibrated_quality import TEXT, host_linears

from gemma_mlx import load
from gemma_mlx.convert.default_model import default_model_path
from gemma_mlx.quality import compare, head_log_probs, head_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    model, processor = load(default_model_path())
    host_linears(model)
    ids = processor.encode_prompt(Path(TEXT).read_text())[: args.tokens]

    def hidden() -> np.ndarray:
        out = model.forward(mx.array([ids]), None, logits_to_keep=1).hidden[0]
        return np.array(out.astype(mx.float32))

    table = head_table(model)
    packed = mx.quantize(mx.array(table), group_size=64, bits=4)
    quantized = mx.dequantize(*packed, group_size=64, bits=4)
    h_float = hidden()
    reference = head_log_probs(model, h_float, table)
    model.language_model.embed_tokens.weight = quantized
    h_quant = hidden()
    quantized = np.array(quantized)
    rows = {
        "head only": head_log_probs(model, h_float, quantized),
        "input lookup only": head_log_probs(model, h_quant, table),
        "both (a 4-bit embedding)": head_log_probs(model, h_quant, quantized),
    }
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"Gemma 3 270M, {len(ids)} Genesis tokens, only the tied embedding at 4-bit g64; load `{uptime}`\n")
    print("| embedding quantized as | perplexity | top-1 agreement | mean KL (nats) |\n|---|---|---|---|")
    for name, lp in rows.items():
        q = compare(reference, lp, ids)
        print(f"| {name} | {q.perplexity:.3f} | {q.top1_agreement:.3f} | {q.mean_kl:.4f} |")


if __name__ == "__main__":
    main()
