"""Prefill and decode speed of a loaded model, measured like mlx-lm's benchmark (random prompt of
fixed length, greedy decode of a fixed number of tokens, several trials)."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from .generate import GenerationStats, generate_tokens, make_cache
from .models.gemma import Model
from .sample import SamplingParams


def benchmark(
    model: Model,
    prompt_tokens: int = 512,
    generation_tokens: int = 128,
    trials: int = 3,
    prefill_step_size: int = 512,
    seed: int = 0,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
) -> GenerationStats:
    """Mean prefill and decode tokens/s over `trials` runs after one warm-up run, and peak memory."""
    vocab = model.config.text.vocab_size
    ids = mx.array(np.random.default_rng(seed).integers(5, min(vocab, 250_000), size=prompt_tokens), mx.int32)
    sample = SamplingParams().token_sampler()  # greedy: decode cost without sampling noise
    prompt_tps, gen_tps = [], []
    mx.reset_peak_memory()
    for trial in range(trials + 1):  # the first run warms up kernels and allocations
        cache = make_cache(model, kv_bits=kv_bits, kv_group_size=kv_group_size)
        start = time.perf_counter()
        tokens = generate_tokens(model, ids, cache, sample, prefill_step_size=prefill_step_size)
        next(tokens)
        first = time.perf_counter()
        for _ in range(generation_tokens - 1):
            next(tokens)
        end = time.perf_counter()
        tokens.close()
        if trial:
            prompt_tps.append(prompt_tokens / (first - start))
            gen_tps.append((generation_tokens - 1) / (end - first))
    return GenerationStats(
        prompt_tokens=prompt_tokens,
        generation_tokens=generation_tokens,
        prompt_tps=float(np.mean(prompt_tps)),
        generation_tps=float(np.mean(gen_tps)),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )
