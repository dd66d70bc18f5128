"""Does speculative decoding ever lose to plain decoding? Decode tok/s of plain decoding against
speculative decoding with drafters that are always wrong and always right (an oracle that knows
plain decoding's output), each with the adaptive controller and with fixed full blocks, in
alternating runs in one process.

    python benchmarks/mtp_never_loses.py [--model DIR] [--tokens 48] [--block 4] [--rounds 3]

A drafter's own cost is left out (these drafters cost nothing), so the fixed-block rows show what
the verify passes alone cost on this backend and the adaptive rows what the controller recovers.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx import SamplingParams, load, make_cache
from gemma_mlx.benchmark import random_ids
from gemma_mlx.convert.default_model import default_model_path
from gemma_mlx.draft_control import DraftControl
from gemma_mlx.generate import generate_tokens


class Scripted:
    """Drafts `sequence[position + 1 ...]` (an oracle), or a token that is never right."""

    def __init__(self, sequence: list[int] | None):
        self.sequence = sequence

    def draft(self, target, cache, token, hidden, n):
        p = cache[0].offset
        if self.sequence is None:
            return mx.full((1, n), -1 % target.config.text.vocab_size, dtype=mx.int32)
        return mx.array([self.sequence[p + 1 : p + 1 + n]], dtype=mx.int32)


class Fixed(DraftControl):
    """Always full blocks: a fixed draft cap, as runtimes without a controller do."""

    def choose(self) -> int:
        self.history.append(self.max_drafts)
        return self.max_drafts


def decode_tps(model, prompt, n, drafter=None, control=None, block=4) -> tuple[float, list[int]]:
    tokens = generate_tokens(
        model,
        prompt,
        make_cache(model),
        SamplingParams().token_sampler(),
        drafter=drafter,
        draft_block_size=block,
        draft_control=control,
    )
    out = [next(tokens)]  # the prompt's prefill ends here
    start = time.perf_counter()
    out += itertools.islice(tokens, n)
    seconds = time.perf_counter() - start
    tokens.close()
    return n / seconds, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    path = a.model or default_model_path()
    model, _ = load(path)
    prompt = random_ids(model, a.prompt_tokens)
    _, plain = decode_tps(model, prompt, a.tokens + a.block)  # warm-up, and the oracle's script
    oracle = prompt.tolist() + plain
    cases = {
        "plain decoding": lambda: (None, None),
        "always wrong, adaptive": lambda: (Scripted(None), DraftControl(a.block - 1)),
        "always wrong, fixed blocks": lambda: (Scripted(None), Fixed(a.block - 1)),
        "oracle, adaptive": lambda: (Scripted(oracle), DraftControl(a.block - 1)),
        "oracle, fixed blocks": lambda: (Scripted(oracle), Fixed(a.block - 1)),
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(a.rounds):
        for name, make in cases.items():
            drafter, control = make()
            tps, out = decode_tps(model, prompt, a.tokens, drafter, control, a.block)
            if out != plain[: len(out)]:
                raise SystemExit(f"{name}: output differs from plain decoding")
            results[name].append(tps)
    base = float(np.median(results["plain decoding"]))
    print(
        f"{path.name}; {a.prompt_tokens}-token prompt, {a.tokens} greedy tokens, blocks of {a.block}, "
        f"median of {a.rounds} alternating rounds; MLX {mx.__version__}, {platform.machine()} "
        f"{platform.system()} ({mx.default_device()})\n"
    )
    print("| decoding | tok/s | vs plain |\n|---|---|---|")
    for name, values in results.items():
        tps = float(np.median(values))
        print(f"| {name} | {tps:.2f} | {tps / base:.2f} |")


if __name__ == "__main__":
    main()
