"""Quantized KV caches: quality on real weights, memory for the 12B, decode speed at depth.

    python benchmarks/kv_cache.py [--model DIR] [--tokens 1024] [--positions 3] [--out FILE]

Quality: Gemma 3 270M (the offline default model, float32) reads segments of a long public-domain
text (benchmarks/data/genesis_kjv.txt: Genesis, King James Version, 1611, from Debian's
`bible-kjv`) through a float cache and through 8- and 4-bit caches (global layers only, and global
+ sliding rings), 256 tokens per chunk, so attention reads the stored keys as decoding does.
Perplexity, mean KL and top-1 agreement against the float cache. Memory: bytes of cache for the
real 12B config (tests/data/gemma-4-12b-config.json) at 8K / 32K / 256K. Speed: decode tok/s
with each cache after prompts of several lengths, in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx import load, make_cache
from gemma_mlx.config import parse_config
from gemma_mlx.convert import estimate
from gemma_mlx.convert.default_model import default_model_path
from gemma_mlx.footprint import kv_cache_bytes
from gemma_mlx.generate import generate_tokens
from gemma_mlx.quality import compare, log_probs
from gemma_mlx.sample import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> make_cache keyword arguments
    "float32": {},
    "8-bit, global layers": dict(kv_bits=8, quantize_rings=False),
    "8-bit, all layers": dict(kv_bits=8),
    "4-bit, global layers": dict(kv_bits=4, quantize_rings=False),
    "4-bit, all layers": dict(kv_bits=4),
}


def quality(model, processor, tokens: int, positions: int) -> list[str]:
    ids = processor.encode_text((ROOT / "benchmarks/data/genesis_kjv.txt").read_text())
    starts = np.linspace(0, len(ids) - tokens - 1, positions).astype(int)
    segments = [[2] + ids[s : s + tokens - 1] for s in starts]  # BOS + a window of the text
    rows = ["| cache | perplexity | mean KL (nats) | top-1 agreement |", "|---|---|---|---|"]
    reference = [log_probs(model, seg, make_cache(model)) for seg in segments]
    for name, kw in VARIANTS.items():
        got = [
            compare(r, log_probs(model, seg, make_cache(model, **kw)), seg)
            for r, seg in zip(reference, segments, strict=True)
        ]
        rows.append(
            f"| {name} | {np.mean([q.perplexity for q in got]):.3f} "
            f"| {np.mean([q.mean_kl for q in got]):.4f} | {np.mean([q.top1_agreement for q in got]):.3f} |"
        )
        print(rows[-1], flush=True)
    return [
        f"Gemma 3 270M (float32 weights), {positions} segments of {tokens} tokens at positions "
        f"{', '.join(map(str, starts))} of {len(ids)} (Genesis, KJV); 256-token chunks through the cache.",
        "",
        *rows,
    ]


def memory() -> list[str]:
    config = parse_config(json.loads((ROOT / "tests/data/gemma-4-12b-config.json").read_text()))
    cfg, weights = config.text, estimate(config, bits=4, group_size=64).weight_bytes  # uniform 4-bit
    rows = [
        "| KV cache | bytes / token (global) | rings (fixed) | 8K | 32K | 256K | 12B 4-bit total at 256K |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, bits in (("bfloat16", None), ("8-bit g64", 8), ("4-bit g64", 4)):
        per, fixed = kv_cache_bytes(cfg, 262144, kv_bits=bits)
        at = [kv_cache_bytes(cfg, n, kv_bits=bits) for n in (8192, 32768, 262144)]
        sizes = [p * n + f for (p, f), n in zip(at, (8192, 32768, 262144), strict=True)]
        rows.append(
            f"| {name} | {per / 1e3:.1f} KB | {fixed / 1e9:.3f} GB | "
            + " | ".join(f"{s / 1e9:.2f} GB" for s in sizes)
            + f" | {(weights + sizes[-1]) / 1e9:.2f} GB |"
        )
    return [
        "Gemma 4 12B (real config), sliding rings of 1024 + 128 rollback slots, scales/biases bf16.",
        "",
        *rows,
    ]


def speed(model, depths: list[int], generate: int) -> list[str]:
    rows = [
        "| cache | " + " | ".join(f"decode tok/s at {d}" for d in depths) + " |",
        "|---|" + "---|" * len(depths),
    ]
    sample = SamplingParams().token_sampler()
    rng = np.random.default_rng(0)
    for name, kw in VARIANTS.items():
        if name.endswith("global layers"):
            continue
        tps = []
        for depth in depths:
            ids = mx.array(rng.integers(5, 20000, size=depth + 1), mx.int32)
            tokens = generate_tokens(model, ids, make_cache(model, **kw), sample, prefill_step_size=512)
            next(tokens)
            start = time.perf_counter()
            for _ in range(generate):
                next(tokens)
            tps.append(generate / (time.perf_counter() - start))
            tokens.close()
        rows.append(f"| {name} | " + " | ".join(f"{t:.2f}" for t in tps) + " |")
        print(rows[-1], flush=True)
    return [f"Gemma 3 270M float32, {generate} greedy tokens after a prompt of the given length.", "", *rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--positions", type=int, default=3)
    ap.add_argument("--depths", default="16,1024,2048")
    ap.add_argument("--generate", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kv_cache_gemma3_270m_cpu.md")
    args = ap.parse_args()
    model, processor = load(args.model or default_model_path())
    machine = f"MLX {mx.__version__}, {platform.machine()} {platform.system()} ({mx.default_device()})"
    lines = ["# Quantized KV cache", "", machine, "", "## Memory", "", *memory(), ""]
    print("\n".join(lines), flush=True)
    lines += ["## Quality", "", *quality(model, processor, args.tokens, args.positions), ""]
    depths = [int(d) for d in args.depths.split(",")]
    lines += ["## Decode speed", "", *speed(model, depths, args.generate), ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
