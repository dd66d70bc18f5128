"""Compute dtype of a quantized checkpoint on this backend: float32 against bfloat16 activations.

    gemma-mlx convert ~/.cache/gemma-mlx/gemma-3-270m-float32 /tmp/270m-q8 --bits 8
    python benchmarks/backend_dtype.py --model /tmp/270m-q8 [--prompt-tokens 64] [--generation-tokens 16]

Loads the same weights with `dtype="float32"` and `dtype="bfloat16"` (the scales, biases and norms
cast; the packed weights are shared bits), alternating runs, and prints a markdown table of
prefill/decode tokens/s (median of the rounds) and what `dtype="auto"` picks here.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx import load
from gemma_mlx.benchmark import benchmark
from gemma_mlx.checkpoint import compute_dtype
from gemma_mlx.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--generation-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    dtypes = ("float32", "bfloat16")
    models = {d: load(args.model, dtype=d)[0] for d in dtypes}
    results: dict[str, list] = {d: [] for d in dtypes}
    for _ in range(args.rounds):  # alternate, so a busy machine slows both alike
        for d in dtypes:
            stats = benchmark(models[d], args.prompt_tokens, args.generation_tokens, trials=1)
            results[d].append((stats.prompt_tps, stats.generation_tps))
            print(
                f"{d}: prefill {stats.prompt_tps:.2f} tok/s, decode {stats.generation_tps:.2f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    quant = load_config(args.model).quantization
    auto = compute_dtype(quant)
    print(
        f"{args.model.name} ({quant.get('bits')}-bit, group {quant.get('group_size')}), "
        f"{args.prompt_tokens}-token prompt, {args.generation_tokens} greedy tokens, median of "
        f"{args.rounds} alternating rounds; MLX {mx.__version__}, {platform.machine()} "
        f'{platform.system()} ({mx.default_device()}); `dtype="auto"` picks '
        f"{'float32' if auto == mx.float32 else 'the stored dtype'} here\n"
    )
    print("| compute dtype | prefill tok/s | decode tok/s |\n|---|---|---|")
    medians = {d: np.median(np.array(results[d]), axis=0) for d in dtypes}
    for d in dtypes:
        print(f"| {d} | {medians[d][0]:.1f} | {medians[d][1]:.2f} |")
    ratio = medians["float32"] / medians["bfloat16"]
    print(f"| float32 / bfloat16 | {ratio[0]:.2f}x | {ratio[1]:.2f}x |")


if __name__ == "__main__":
    main()
