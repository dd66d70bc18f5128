"""Memory per extra batch row for the Gemma 4 12B, from its config, and the rows a 16 GB Mac holds.

    python benchmarks/kv_per_row.py [--free-gb 11.45] [--bandwidth-gb 120] [--out FILE]

A row (one request in a batch) holds its own KV cache: the 8 global layers grow with its context,
the 40 sliding layers hold rings of window + rollback slack (1024 + 128) tokens at most. Bytes
come from `gemma_mlx.footprint.kv_cache_bytes`, the function behind `gemma-mlx info` and the
load-time memory warning (which checks an 8K context); quantized caches add a bf16 scale and bias
per group of 64. The config is tests/data/gemma-4-12b-config.json (the released config, rebuilt
from shared/design/gemma4-12b.md); 4-bit weights from `gemma_mlx.convert.estimate` (group 64,
embedding quantized, vision and audio towers left in bf16, as `gemma-mlx convert --bits 4`).

Rows that fit = floor((free memory - weights) / bytes per row). Free memory assumed for a 16 GB
Mac: `--free-gb` (default 11.45 GB = 2/3 of 16 GiB: an assumption, about what Metal reports as the
recommended working set of a 16 GB Apple silicon Mac, the figure mlx-lm wires memory up to; macOS
and open apps take the rest; not measured here, there is no Mac). Nothing is
set aside for activations or the prefix cache's snapshots (`--cache-gb`, 4 GB at most by
default, spent only as conversations are cached): `--reserve-gb` subtracts such a reserve.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gemma_mlx.config import parse_config
from gemma_mlx.convert import estimate
from gemma_mlx.footprint import kv_cache_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests/data/gemma-4-12b-config.json"
CACHES = (("bf16", None), ("8-bit g64", 8), ("4-bit g64", 4))
CONTEXTS = (8192, 32768)


def row_bytes(text, context: int, kv_bits: int | None) -> int:
    """KV cache bytes one row holds at `context` tokens."""
    per_token, rings = kv_cache_bytes(text, context, kv_bits=kv_bits)
    return per_token * context + rings


def rows_that_fit(free: float, weights: float, row: float, reserve: float = 0.0) -> int:
    return max(0, int((free - weights - reserve) // row))


def report(free_gb: float, reserve_gb: float) -> str:
    config = parse_config(json.loads(CONFIG.read_text()))
    text = config.text
    weights = estimate(config, bits=4, group_size=64).weight_bytes
    globals_, sliding = sum(not s.sliding for s in text.layers), sum(s.sliding for s in text.layers)
    free, reserve = free_gb * 1e9, reserve_gb * 1e9
    lines = [
        "# Memory per extra row: Gemma 4 12B",
        "",
        f"From the config ({CONFIG.relative_to(ROOT)}): {globals_} global layers growing with the context, "
        f"{sliding} sliding layers holding rings of {text.sliding_window} + 128 tokens; "
        "`gemma_mlx.footprint.kv_cache_bytes` (scales and biases of quantized caches in bf16, group 64). "
        "GB = 1e9 bytes.",
        "",
        "| KV cache | global bytes / token | rings per row | per row at 8K | per row at 32K |",
        "|---|---|---|---|---|",
    ]
    for name, bits in CACHES:
        per_token, rings = kv_cache_bytes(text, max(CONTEXTS), kv_bits=bits)
        sizes = [row_bytes(text, n, bits) for n in CONTEXTS]
        lines.append(
            f"| {name} | {per_token / 1e3:.1f} KB | {rings / 1e9:.3f} GB | "
            + " | ".join(f"{s / 1e9:.3f} GB" for s in sizes)
            + " |"
        )
    lines += [
        "",
        "## Rows a 16 GB Mac holds with the 12B at 4-bit",
        "",
        f"Weights at 4-bit (group 64, towers in bf16): {weights / 1e9:.2f} GB. Free memory assumed: "
        f"{free_gb:.2f} GB (assumed: 2/3 of 16 GiB, about Metal's recommended working set on a 16 GB Mac)"
        + (f", less a {reserve_gb:.2f} GB reserve" if reserve_gb else ", nothing reserved")
        + f"; left for KV caches: {(free - weights - reserve) / 1e9:.2f} GB.",
        "",
        "| KV cache | rows at 8K context | rows at 32K context |",
        "|---|---|---|",
    ]
    for name, bits in CACHES:
        fits = [rows_that_fit(free, weights, row_bytes(text, n, bits), reserve) for n in CONTEXTS]
        lines.append(f"| {name} | {fits[0]} | {fits[1]} |")
    default = rows_that_fit(free, weights, row_bytes(text, 8192, None), reserve)
    lines += [
        "",
        f"A `--max-concurrency` default computed as the memory warning counts a request (8K context, "
        f"the default bf16 KV cache): **{default}** rows on a 16 GB Mac with the 12B at 4-bit; "
        f"with `--kv-bits 8` {rows_that_fit(free, weights, row_bytes(text, 8192, 8), reserve)}, "
        f"`--kv-bits 4` {rows_that_fit(free, weights, row_bytes(text, 8192, 4), reserve)}. "
        "The prefix cache's snapshots (`--cache-gb`) compete for the same memory.",
        "",
    ]
    return "\n".join(lines)


def bandwidth_bound(bandwidth_gb: float, model_270m: Path | None) -> str:
    """Aggregate decode tok/s a bandwidth-bound device would give B rows: each step reads the
    weights once and every row's KV cache; B tokens per step."""
    config = parse_config(json.loads(CONFIG.read_text()))
    cases = [
        (
            "Gemma 4 12B, 4-bit weights, bf16 KV, 8K context per row",
            estimate(config, bits=4, group_size=64).bytes_per_token,
            row_bytes(config.text, 8192, None),
        )
    ]
    if model_270m is not None and model_270m.is_dir():
        from gemma_mlx.footprint import footprint

        fp = footprint(model_270m, 64, kv_dtype_bytes=4)  # concurrency.py: ~30 + 24 tokens, float32
        cases.insert(
            0, (f"{model_270m.name}, float32 KV, 64 tokens per row", fp.bytes_per_token, fp.kv_bytes)
        )
    batches = (1, 2, 4, 8)
    lines = [
        f"## Decode bound of a batch on a bandwidth-bound device ({bandwidth_gb:.0f} GB/s)",
        "",
        "Bytes per step = weights one decoded token reads (`decode_bytes`: text weights, the tied "
        "embedding once as the LM head) + B x KV cache of a row; aggregate tok/s <= B x bandwidth / "
        f"bytes per step. {bandwidth_gb:.0f} GB/s is an assumption (`--bandwidth-gb`; a base M4 is "
        "quoted at 120 GB/s). Compute and per-step overhead come on top.",
        "",
        "| model | weights read / step | KV / row | " + " | ".join(f"B={b} tok/s" for b in batches) + " |",
        "|---|---|---|" + "---|" * len(batches),
    ]
    for name, weights, kv in cases:
        rates = [b * bandwidth_gb * 1e9 / (weights + b * kv) for b in batches]
        lines.append(
            f"| {name} | {weights / 1e9:.3f} GB | {kv / 1e6:.1f} MB | "
            + " | ".join(f"{r:.0f}" for r in rates)
            + " |"
        )
    return "\n".join([*lines, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--free-gb", type=float, default=16 * 2**30 * 2 / 3 / 1e9)
    ap.add_argument("--reserve-gb", type=float, default=0.0)
    ap.add_argument("--bandwidth-gb", type=float, default=120.0)
    ap.add_argument("--model-270m", type=Path, default=Path.home() / ".cache/gemma-mlx/gemma-3-270m-float32")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kv_per_row_gemma4_12b.md")
    args = ap.parse_args()
    text = report(args.free_gb, args.reserve_gb) + "\n" + bandwidth_bound(args.bandwidth_gb, args.model_270m)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
