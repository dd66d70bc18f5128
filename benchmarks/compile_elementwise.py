"""Does `mx.compile` pay for the decode step's elementwise chains? Times, in one process and
alternating, the chains a Gemma decode step runs per token at a given size, plain and compiled:
final-logit soft-capping over the vocabulary and the GELU gate of every MLP (`gelu(g) * u`).

    python benchmarks/compile_elementwise.py [--vocab 262144] [--intermediate 2048] [--layers 18]

(defaults: Gemma 3 270M; the 12B is --intermediate 15360 --layers 48)
"""

from __future__ import annotations

import argparse
import platform
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def softcap(x: mx.array) -> mx.array:
    return mx.tanh(x / 30.0) * 30.0


def gate(g: mx.array, u: mx.array) -> mx.array:
    return nn.gelu_approx(g) * u


def per_call(fn, args, calls: int) -> float:
    """Seconds per call, each call evaluated on its own as a decode step does."""
    mx.eval(fn(*args))
    start = time.perf_counter()
    for _ in range(calls):
        mx.eval(fn(*args))
    return (time.perf_counter() - start) / calls


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    logits = mx.random.normal((1, a.vocab))
    g, u = mx.random.normal((1, 1, a.intermediate)), mx.random.normal((1, 1, a.intermediate))
    cases = {"soft-capping": (softcap, (logits,), 1), "GELU gate": (gate, (g, u), a.layers)}
    print(
        f"MLX {mx.__version__}, {platform.machine()} {platform.system()} ({mx.default_device()}); "
        f"vocab {a.vocab}, intermediate {a.intermediate}, {a.layers} layers; median of {a.rounds} "
        f"alternating rounds of {a.calls} calls\n"
    )
    print("| chain | plain us/call | compiled us/call | saved per token (us) |\n|---|---|---|---|")
    for name, (fn, args, per_token) in cases.items():
        compiled = mx.compile(fn)
        plain, comp = [], []
        for _ in range(a.rounds):
            plain.append(per_call(fn, args, a.calls))
            comp.append(per_call(compiled, args, a.calls))
        tp, tc = np.median(plain) * 1e6, np.median(comp) * 1e6
        print(f"| {name} | {tp:.1f} | {tc:.1f} | {(tp - tc) * per_token:.1f} |")


if __name__ == "__main__":
    main()
