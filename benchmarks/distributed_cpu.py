"""Pipeline-parallel generation vs one process: per-rank memory, prefill/decode speed, bytes sent.

One process:      python benchmarks/distributed_cpu.py --model DIR
Two ranks:        mlx.launch --backend ring -n 2 --hosts 127.0.0.1 -- \\
                      python benchmarks/distributed_cpu.py --model DIR --distributed
Each rank prints one JSON line: its layers, parameter bytes, active memory after loading and
peak memory; rank 0 (or the single process) also prefill and decode tok/s (greedy, random prompt
ids) and the bytes it sent per decoded token (two runs that differ only in the tokens decoded).
"""

from __future__ import annotations

import argparse
import json
import resource

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gemma_mlx import generate, load
from gemma_mlx.distributed import Stage, load_stage
from gemma_mlx.processor import Processor


def memory(module) -> dict:
    return {
        "param_gb": sum(v.nbytes for _, v in tree_flatten(module.parameters())) / 1e9,
        "active_gb": mx.get_active_memory() / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--distributed", action="store_true")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    link = None
    if args.distributed:
        group = mx.distributed.init(strict=True)
        model = load_stage(args.model, group)
        report = {
            "rank": group.rank(),
            "ranks": group.size(),
            "layers": [model.indices.start, model.indices.stop],
        }
        report.update(memory(model))
        if isinstance(model, Stage):
            model.follow()
            report["peak_gb"] = mx.get_peak_memory() / 1e9
            report["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            report["bytes_sent"] = model._link.bytes_sent
            print(json.dumps(report), flush=True)
            return
        link = model.link
        processor = Processor.from_dir(args.model)
    else:
        model, processor = load(args.model)
        report = {"rank": 0, "ranks": 1, "layers": [0, model.config.text.num_hidden_layers], **memory(model)}
    vocab = model.config.text.vocab_size
    ids = (
        np.random.default_rng(0)
        .integers(min(1000, vocab // 4), min(20000, vocab), args.prompt_tokens)
        .tolist()
    )

    def run(n: int):
        before = link.bytes_sent if link else 0
        r = generate(model, processor, ids, max_tokens=n)
        return r.stats, (link.bytes_sent - before) if link else 0

    generate(model, processor, ids[:16], max_tokens=2)  # warm up
    prefill, decode, per_token = [], [], []
    for _ in range(args.repeats):
        short, sent_short = run(1)
        full, sent_full = run(1 + args.tokens)
        prefill += [short.prompt_tps, full.prompt_tps]
        decode.append(full.generation_tps)
        per_token.append((sent_full - sent_short) / args.tokens)
    report.update(
        prefill_tps=float(np.median(prefill)),
        decode_tps=float(np.median(decode)),
        bytes_sent_per_decoded_token=float(np.median(per_token)),
        peak_gb=mx.get_peak_memory() / 1e9,
        max_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    )
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
