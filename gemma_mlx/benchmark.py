"""Prefill and decode speed of a loaded model, measured like mlx-lm's benchmark (random prompt of
fixed length, greedy decode of a fixed number of tokens, several trials)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

from .generate import generate_tokens, make_cache
from .models.gemma import Model
from .sample import make_sampler


@dataclass
class BenchResult:
    prompt_tokens: int
    generation_tokens: int
    trials: int
    prompt_tps: float  # mean over trials
    generation_tps: float
    peak_memory_gb: float

    def as_dict(self) -> dict:
        return asdict(self)


def benchmark(
    model: Model,
    prompt_tokens: int = 512,
    generation_tokens: int = 128,
    trials: int = 3,
    prefill_step_size: int = 512,
    seed: int = 0,
) -> BenchResult:
    vocab = model.config.text.vocab_size
    ids = mx.array(np.random.default_rng(seed).integers(5, min(vocab, 250_000), size=prompt_tokens), mx.int32)
    sampler = make_sampler()  # greedy: decode cost without sampling noise
    prompt_tps, gen_tps = [], []
    mx.reset_peak_memory()
    for trial in range(trials + 1):  # the first run warms up kernels and allocations
        cache = make_cache(model)
        start = time.perf_counter()
        tokens = generate_tokens(model, ids, cache, sampler, prefill_step_size=prefill_step_size)
        next(tokens)
        first = time.perf_counter()
        for _ in range(generation_tokens - 1):
            next(tokens)
        end = time.perf_counter()
        tokens.close()
        if trial:
            prompt_tps.append(prompt_tokens / (first - start))
            gen_tps.append((generation_tokens - 1) / (end - first))
    return BenchResult(
        prompt_tokens,
        generation_tokens,
        trials,
        float(np.mean(prompt_tps)),
        float(np.mean(gen_tps)),
        mx.get_peak_memory() / 1e9,
    )
