"""gemma-mlx vs mlx-lm on the same weights, in the same process and run.

    pip install mlx-lm   # benchmark-only; not a gemma-mlx dependency
    python benchmarks/compare_mlx_lm.py [--model DIR] [--prompt-tokens 128] [--generation-tokens 32]

The default model is the offline Gemma 3 270M (a `gemma3_text` checkpoint both runtimes load;
mlx-lm cannot run the unified 12B's image/audio paths). Both decode greedily from the same random
prompt; the ratio of tokens/s is what this measures. A checkpoint converted by gemma-mlx is
renamed for mlx-lm into a temporary directory (tensor data is unchanged).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx import load
from gemma_mlx.benchmark import benchmark
from gemma_mlx.checkpoint import read_weights
from gemma_mlx.convert.default_model import default_model_path


def mlx_lm_copy(src: Path, dst: Path) -> Path:
    """Our names (`language_model.layers...`) -> mlx-lm's (`model.layers...`)."""
    weights = {("model." + k.removeprefix("language_model.")): v for k, v in read_weights(src).items()}
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def bench_mlx_lm(path: Path, prompt_tokens: int, generation_tokens: int, trials: int) -> tuple[float, float]:
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompt = mx.array(np.random.default_rng(0).integers(5, min(vocab, 250_000), size=prompt_tokens), mx.int32)
    prompt_tps, gen_tps = [], []
    for trial in range(trials + 1):
        start = time.perf_counter()
        steps = generate_step(
            prompt, model, max_tokens=generation_tokens, sampler=lambda x: mx.argmax(x, axis=-1)
        )
        next(steps)
        first = time.perf_counter()
        for _ in steps:
            pass
        end = time.perf_counter()
        if trial:
            prompt_tps.append(prompt_tokens / (first - start))
            gen_tps.append((generation_tokens - 1) / (end - first))
    return float(np.mean(prompt_tps)), float(np.mean(gen_tps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--generation-tokens", type=int, default=32)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    path = args.model or default_model_path()
    model, _ = load(path)
    ours = benchmark(model, args.prompt_tokens, args.generation_tokens, args.trials)
    del model
    with tempfile.TemporaryDirectory() as tmp:
        theirs = bench_mlx_lm(
            mlx_lm_copy(path, Path(tmp)), args.prompt_tokens, args.generation_tokens, args.trials
        )
    import mlx_lm

    lines = [
        f"{path.name}, {args.prompt_tokens}-token prompt, {args.generation_tokens} greedy tokens, mean of "
        f"{args.trials} trials; MLX {mx.__version__}, mlx-lm {mlx_lm.__version__}, {platform.machine()} "
        f"{platform.system()} ({mx.default_device()})",
        "",
        "| runtime | prefill tok/s | decode tok/s |",
        "|---|---|---|",
        f"| gemma-mlx | {ours.prompt_tps:.1f} | {ours.generation_tps:.2f} |",
        f"| mlx-lm | {theirs[0]:.1f} | {theirs[1]:.2f} |",
        f"| ratio | {ours.prompt_tps / theirs[0]:.2f} | {ours.generation_tps / theirs[1]:.2f} |",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
