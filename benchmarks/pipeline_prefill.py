"""Chunked prefill through a 2-rank pipeline: overlapped stages vs one after the other, and where
each rank computes.

One process:  python benchmarks/pipeline_prefill.py --model DIR
Two ranks:    (MLX_HOSTFILE, MLX_RANK as `mlx.launch --backend ring` sets them)
              python benchmarks/pipeline_prefill.py --model DIR --distributed
Rank 0 (or the single process) prints prefill tok/s (median; with two ranks, alternating runs of
the overlapped `PipelineModel.prefill_chunks` and the sequential `Model.prefill_chunks`) and, for
the last overlapped run, each chunk's compute interval on rank 0 (time.time()); rank 1 prints its
compute intervals (recv end .. send start of each hidden state), to be matched by time.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import numpy as np

from gemma_mlx import load
from gemma_mlx.distributed import Stage, load_stage
from gemma_mlx.models.gemma import Model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--distributed", action="store_true")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--step", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers-per-rank", help="e.g. 9,9 (default: split by bytes)")
    args = ap.parse_args()
    if args.distributed:
        split = [int(n) for n in args.layers_per_rank.split(",")] if args.layers_per_rank else None
        model = load_stage(args.model, mx.distributed.init(strict=True), layers_per_rank=split)
        if isinstance(model, Stage):
            model._link.events = []
            model.follow()
            events = model._link.events
            computes = [(r[1], s[1]) for r, s in zip(events[::2], events[1::2], strict=True)]
            print(json.dumps({"rank": 1, "computes": computes}), flush=True)
            return
        model.link.events = []
    else:
        model, _ = load(args.model)
    vocab = model.config.text.vocab_size
    ids = mx.array(np.random.default_rng(0).integers(1000, min(20000, vocab), args.prompt_tokens))
    chunks = [{"input_ids": ids[None, s : s + args.step]} for s in range(0, args.prompt_tokens, args.step)]
    runners = {"sequential": lambda *a: Model.prefill_chunks(model, *a)}
    if args.distributed:
        runners["overlapped"] = model.prefill_chunks
    tps = {name: [] for name in runners}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, runner in runners.items():
            ends = []
            if args.distributed:
                model.link.events.clear()
            start = time.time()
            runner(chunks, model.make_cache(), lambda i, ends=ends: ends.append(time.time()))
            if repeat:
                tps[name].append(args.prompt_tokens / (time.time() - start))
    report = {"ranks": 2 if args.distributed else 1, "step": args.step, "prompt_tokens": args.prompt_tokens}
    report.update({f"{name}_tps": float(np.median(v)) for name, v in tps.items()})
    report["runs_tps"] = tps
    if args.distributed:  # the last overlapped run: chunk k computes from when chunk k+1 was sent
        recvs = [e[1] for e in model.link.events if e[0] == "recv"]
        sent = [e[2] for e in model.link.events if e[0] == "send"][1:] + [recvs[-1]]
        report["computes"] = [(max(r, s), e) for r, s, e in zip(recvs, sent, ends, strict=True)]
    print(json.dumps(report), flush=True)
    if args.distributed:
        model.close()


if __name__ == "__main__":
    main()
