"""Prefill and decode speed of a loaded model, measured like mlx-lm's benchmark (random prompt of
fixed length, greedy decode of a fixed number of tokens, several trials)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import Cache
from .draft_control import DraftControl
from .generate import GenerationStats, generate_tokens, make_cache
from .media import SAMPLE_RATE, synthetic_audio, synthetic_image
from .models.drafter import Drafter
from .models.gemma import Model
from .processor import Processor
from .sample import SamplingParams
from .video import synthetic_video


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


# -- `gemma-mlx bench`: prefill at several prompt lengths, decode at context depths, TTFT,
# bandwidth, and speculative decoding against plain decoding in the same run.


def random_ids(model: Model, n: int, seed: int = 0) -> mx.array:
    vocab = model.config.text.vocab_size
    return mx.array(np.random.default_rng(seed).integers(5, min(vocab, 250_000), size=n), mx.int32)


def kv_bytes_read(cache: list[Cache]) -> int:
    """Bytes of keys and values a decode step reads from `cache` (its filled slots)."""
    return sum(a.nbytes for c in cache if c.state is not None for _, a in tree_flatten(c.state[:2]))


@dataclass
class Run:
    """One timed generation: `ttft_s` from the start to the first token (the prompt's prefill
    plus one step), then the decode rate of the following tokens."""

    prompt_tokens: int
    ttft_s: float
    decode_tps: float
    kv_bytes: int  # read per decode step, at the end of the prompt
    rounds: int = 0  # speculative: rounds (with or without drafts) and drafts
    drafted: int = 0
    accepted: int = 0


def timed_run(
    model: Model,
    ids: mx.array,
    generation_tokens: int,
    *,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prefill_step_size: int = 512,
    drafter: Drafter | None = None,
    draft_block_size: int = 4,
) -> Run:
    cache = make_cache(model, kv_bits=kv_bits, kv_group_size=kv_group_size)
    sample = SamplingParams().token_sampler()
    stats, control = GenerationStats(), DraftControl(draft_block_size - 1)
    start = time.perf_counter()
    tokens = generate_tokens(
        model,
        ids,
        cache,
        sample,
        drafter=drafter,
        draft_block_size=draft_block_size,
        draft_control=control,
        stats=stats,
        prefill_step_size=prefill_step_size,
    )
    next(tokens)
    first = time.perf_counter()
    kv = kv_bytes_read(cache)
    for _ in range(generation_tokens - 1):
        next(tokens)
    end = time.perf_counter()
    tokens.close()
    mx.synchronize()  # the step queued ahead must not run into the next measurement
    tps = (generation_tokens - 1) / (end - first) if generation_tokens > 1 else 0.0
    return Run(ids.shape[0], first - start, tps, kv, len(control.history), stats.drafted, stats.accepted)


def median_run(runs: list[Run]) -> Run:
    """The run with the median decode rate (TTFT: the median of all)."""
    best = sorted(runs, key=lambda r: r.decode_tps)[len(runs) // 2]
    return replace(best, ttft_s=float(np.median([r.ttft_s for r in runs])))


def measure(trials: int, fn: Callable[[], Run]) -> Run:
    """`trials` runs after one warm-up run; the median."""
    fn()
    return median_run([fn() for _ in range(trials)])


def media_prefill(
    model: Model,
    processor: Processor,
    trials: int = 3,
    audio_seconds: float = 3.0,
    prefill_step_size: int = 512,
) -> list[dict]:
    """Latency of a prompt with one image (the default soft-token budget), of one with a few
    seconds of audio and of one with an 8-frame 640x360 video (pre-sampled frames, 70 soft tokens
    each), for the media the model takes: `preprocess_s` (pixels or samples -> tensors,
    `Processor.prepare`), `ttft_s` (prefill with the media embedded, plus the first token) and the
    prompt's tokens per second of TTFT. Medians of `trials` after a warm-up."""
    cases = []
    if model.config.vision is not None:
        cases.append(("image", {"images": [synthetic_image(0, 768, 1024)]}))
    if model.config.audio is not None:
        cases.append(
            (f"audio {audio_seconds:g} s", {"audio": [(synthetic_audio(0, audio_seconds), SAMPLE_RATE)]})
        )
    if model.config.vision is not None:
        cases.append(("video 8 frames", {"videos": [(synthetic_video(8, 360, 640), 2.0)]}))
    sample = SamplingParams().token_sampler()
    rows = []
    for name, media in cases:
        prep, ttft = [], []
        for trial in range(trials + 1):
            start = time.perf_counter()
            inputs = processor.prepare("Describe this.", **media)
            kwargs = inputs.model_kwargs()
            mx.eval(kwargs)
            ready = time.perf_counter()
            tokens = generate_tokens(
                model,
                mx.array(inputs.ids, mx.int32),
                make_cache(model),
                sample,
                media=kwargs,
                prefill_step_size=prefill_step_size,
            )
            next(tokens)
            end = time.perf_counter()
            tokens.close()
            mx.synchronize()
            if trial:
                prep.append(ready - start)
                ttft.append(end - ready)
        n = len(inputs.ids)
        c = model.config
        media_id = {"image": c.image_token_id, "audio": c.audio_token_id, "video": c.video_token_id}[
            name.split()[0]
        ]
        rows.append(
            {
                "input": name,
                "prompt_tokens": n,
                "media_tokens": inputs.ids.count(media_id),
                "preprocess_s": float(np.median(prep)),
                "ttft_s": float(np.median(ttft)),
                "prefill_tps": n / float(np.median(ttft)),
            }
        )
    return rows


def copy_bandwidth(nbytes: int = 256 * 2**20, trials: int = 5) -> float:
    """Bytes per second this machine moves copying a `nbytes` float32 buffer with MLX (read plus
    write; the best of `trials`): the roof that decode speed is compared with."""
    a = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(a)
    best = float("inf")
    for _ in range(trials + 1):
        start = time.perf_counter()
        b = mx.negative(a)  # a bandwidth-bound copy: one read, one write per element
        mx.eval(b)
        best = min(best, time.perf_counter() - start)
        del b
    return 2 * nbytes / best


def default_depths() -> list[int]:
    """Context depths to decode at: llama-bench's on a GPU, short ones on the slow CPU backend."""
    return [0, 1024, 4096, 16384] if mx.default_device() == mx.gpu else [0, 256]


def bench_report(
    model: Model,
    weight_bytes: int,
    *,
    prompt_lengths: Sequence[int] = (128, 512),
    depths: Sequence[int] | None = None,
    generation_tokens: int = 64,
    trials: int = 3,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    drafter: Drafter | None = None,
    draft_block_size: int = 4,
    bandwidth_bytes: int = 256 * 2**20,
    processor: Processor | None = None,
) -> dict:
    """Everything `gemma-mlx bench` reports, as one JSON-ready dict. `weight_bytes` is what a
    decode step reads of the weights (`footprint(path).bytes_per_token`); GB/s adds the KV cache
    read at each depth. With a `processor`, a unified model's image, audio and video prefill latency too
    (`media`)."""
    depths = default_depths() if depths is None else list(depths)
    kv = dict(kv_bits=kv_bits, kv_group_size=kv_group_size)
    mx.reset_peak_memory()
    prefill = []
    for n in prompt_lengths:
        r = measure(trials, lambda n=n: timed_run(model, random_ids(model, n), 1, **kv))
        prefill.append({"prompt_tokens": n, "prefill_tps": n / r.ttft_s, "ttft_s": r.ttft_s})
    bandwidth = copy_bandwidth(bandwidth_bytes)
    decode, runs = [], {}
    for depth in depths:
        ids = random_ids(model, depth + 1, seed=depth + 1)
        r = runs[depth] = measure(trials, lambda ids=ids: timed_run(model, ids, generation_tokens, **kv))
        per_token = weight_bytes + r.kv_bytes
        gbps = per_token * r.decode_tps / 1e9
        decode.append(
            {
                "depth": depth,
                "decode_tps": r.decode_tps,
                "bytes_per_token": per_token,
                "gb_per_s": gbps,
                "bandwidth_fraction": gbps * 1e9 / bandwidth,
            }
        )
    report = {
        "prefill": prefill,
        "decode": decode,
        "ttft_s": prefill[-1]["ttft_s"],
        "prompt_tps": prefill[-1]["prefill_tps"],
        "generation_tps": decode[0]["decode_tps"],
        "bytes_per_token": decode[0]["bytes_per_token"],
        "weights_gb_per_s": weight_bytes * decode[0]["decode_tps"] / 1e9,
        "gb_per_s": decode[0]["gb_per_s"],
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "bandwidth_fraction": decode[0]["bandwidth_fraction"],
        "generation_tokens": generation_tokens,
        "trials": trials,
        "device": str(mx.default_device()),
    }
    if drafter is not None:
        depth = depths[0]
        ids = random_ids(model, depth + 1, seed=depth + 1)
        spec = measure(
            trials,
            lambda: timed_run(
                model, ids, generation_tokens, drafter=drafter, draft_block_size=draft_block_size, **kv
            ),
        )
        report["draft"] = {
            "depth": depth,
            "max_block_size": draft_block_size,
            "decode_tps": spec.decode_tps,
            "plain_decode_tps": runs[depth].decode_tps,
            "speedup": spec.decode_tps / runs[depth].decode_tps,
            "acceptance": spec.accepted / spec.drafted if spec.drafted else 0.0,
            "tokens_per_round": generation_tokens / spec.rounds,
            "drafted": spec.drafted,
            "accepted": spec.accepted,
        }
    if processor is not None and (model.config.vision is not None or model.config.audio is not None):
        report["media"] = media_prefill(model, processor, trials)
    report["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    return report
