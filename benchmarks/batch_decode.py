"""Decode throughput of the generation core against the number of rows it decodes together.

    python benchmarks/batch_decode.py [--tiny | --model DIR] [--rows 1,2,4,8] [--tokens 32] [--kv-bits 8]
        [--peer]

For each batch size B: B different prompts are prefilled (not timed), then B rows decode
`--tokens` tokens each in one `Batch`; aggregate generated tok/s = B x tokens / decode time, and
the time of one step. Also what a row's join or leave costs (the merged caches are rebuilt: each
row's cache split back out and all merged again), at the depth reached. The default model is
the offline Gemma 3 270M; `--tiny` a random tiny Gemma 4 (hidden 128, 8 layers), whose step is
dominated by per-step overhead rather than by the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from gemma_mlx import load
from gemma_mlx.cache import merge_caches, split_caches
from gemma_mlx.generate import Batch, make_cache, prepare_request

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()


def model_and_name(tiny: bool, path: Path | None = None):
    if path is not None:
        return load(path), str(path)
    if tiny:
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from tiny import save_checkpoint

        path = save_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
        return load(path), "random tiny Gemma 4 (hidden 128, 8 layers, vocabulary 512)"
    from gemma_mlx.convert.default_model import default_model_path

    return load(default_model_path()), "Gemma 3 270M (float32, vocabulary 262,144)"


def measure(model, processor, rows: int, tokens: int, kv_bits: int | None) -> dict:
    batch = Batch(model)
    for i in range(rows):
        prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(20 + 3 * i))
        cache = make_cache(model, kv_bits=kv_bits)
        request = prepare_request(model, processor, prompt, cache=cache, max_tokens=tokens + 2)
        batch.add(request.row)
    while batch.joining:  # prefill everything and feed every prompt's last token (not timed)
        batch.step()
    batch.step()
    mx.eval([r.logits for r in batch.rows])
    tic = time.perf_counter()
    for _ in range(tokens):
        batch.step()
    mx.eval([r.logits for r in batch.rows])
    elapsed = time.perf_counter() - tic
    out = {"rows": rows, "tok_s": rows * tokens / elapsed, "step_ms": 1000 * elapsed / tokens}
    if rows > 1:  # a leave or join rebuilds the merged caches
        merged = batch._caches()
        tic = time.perf_counter()
        again = merge_caches(split_caches(merged))
        mx.eval([(c.keys, c.values) for c in again])
        out["rebuild_ms"] = 1000 * (time.perf_counter() - tic)
        out["kv_mb"] = sum(c.nbytes for c in again) / 1e6
    return out


def measure_peer(path: Path, rows: int, tokens: int) -> dict:
    """The same measurement with mlx-lm's `BatchGenerator` (continuous batching, left-padded
    batch caches) on the same weights: decode steps after every row has its first token."""
    from mlx_lm import load as lm_load
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = lm_load(str(path))
    gen = BatchGenerator(model, max_tokens=tokens + 4, completion_batch_size=rows, prefill_batch_size=rows)
    prompts = [
        tokenizer.encode(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(20 + 3 * i)))
        for i in range(rows)
    ]
    gen.insert(prompts)
    started: set[int] = set()
    while len(started) < rows:
        started.update(r.uid for r in gen.next()[1])  # (prompt responses, generation responses)
    tic = time.perf_counter()
    for _ in range(tokens):
        gen.next()
    elapsed = time.perf_counter() - tic
    gen.close()
    return {"rows": rows, "tok_s": rows * tokens / elapsed, "step_ms": 1000 * elapsed / tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint (default: the offline 270M)")
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--kv-bits", type=int, default=None)
    ap.add_argument("--peer", action="store_true", help="also mlx-lm's BatchGenerator (270M)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    (model, processor), name = model_and_name(args.tiny, args.model)
    measure(model, processor, 2, 4, args.kv_bits)  # warm up
    results, peer = [], []
    for b in args.rows.split(","):
        results.append(measure(model, processor, int(b), args.tokens, args.kv_bits))
        if args.peer:
            from gemma_mlx.convert.default_model import default_model_path

            peer.append(measure_peer(args.model or default_model_path(), int(b), args.tokens))
            print(results[-1], peer[-1], flush=True)
    base = results[0]["tok_s"]
    report = {
        "model": name,
        "machine": f"{platform.system()} {platform.machine()}, MLX {mx.__version__}, {mx.default_device()}",
        "tokens_per_row": args.tokens,
        "kv_bits": args.kv_bits,
        "results": [{**r, "vs_one_row": r["tok_s"] / base} for r in results],
    }
    if peer:
        report["mlx_lm"] = peer
        report["ours_over_mlx_lm"] = [r["tok_s"] / p["tok_s"] for r, p in zip(results, peer, strict=True)]
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
