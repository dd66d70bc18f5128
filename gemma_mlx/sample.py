"""Token sampling as lazy MLX ops (no host syncs): temperature, top-k, top-p, min-p, suppression.

Filters follow transformers' logits warpers and their order in `generate`
(temperature -> top-k -> top-p -> min-p), each keeping at least one token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx

Sampler = Callable[[mx.array, mx.array | None], mx.array]
NEG_INF = float("-inf")


def _check(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1] (1 = off)")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p={min_p}: must be in [0, 1) (0 = off)")


def top_k_filter(logits: mx.array, k: int) -> mx.array:
    """Keep the `k` largest logits (ties at the k-th value kept, as `TopKLogitsWarper`)."""
    if k >= logits.shape[-1]:
        return logits
    kth = mx.min(mx.topk(logits, k, axis=-1), axis=-1, keepdims=True)
    return mx.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability mass reaches `p`
    (`TopPLogitsWarper`: drop tokens whose ascending cumulative mass is <= 1 - p). Tokens tied
    with the last kept one are kept too, so the result does not depend on sort order."""
    sorted_logits = mx.sort(logits, axis=-1)
    cum = mx.cumsum(mx.softmax(sorted_logits, axis=-1), axis=-1)
    first_kept = mx.sum(cum <= 1 - p, axis=-1, keepdims=True)
    first_kept = mx.minimum(first_kept, logits.shape[-1] - 1)  # min_tokens_to_keep = 1
    threshold = mx.take_along_axis(sorted_logits, first_kept, axis=-1)
    return mx.where(logits < threshold, NEG_INF, logits)


def min_p_filter(logits: mx.array, min_p: float) -> mx.array:
    """Drop tokens less likely than `min_p` times the most likely one (`MinPLogitsWarper`)."""
    probs = mx.softmax(logits, axis=-1)
    return mx.where(probs < min_p * mx.max(probs, axis=-1, keepdims=True), NEG_INF, logits)


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Sampler:
    """Return `sample(logits [B, V], key) -> token ids [B]`; temperature 0 is greedy argmax."""
    _check(temperature, top_k, top_p, min_p)
    if temperature == 0:
        return lambda logits, key=None: mx.argmax(logits, axis=-1)

    def sample(logits: mx.array, key: mx.array | None = None) -> mx.array:
        logits = logits.astype(mx.float32) / temperature
        if top_k:
            logits = top_k_filter(logits, top_k)
        if top_p < 1:
            logits = top_p_filter(logits, top_p)
        if min_p:
            logits = min_p_filter(logits, min_p)
        return mx.random.categorical(logits, axis=-1, key=key)

    return sample


def make_logits_processor(suppress_ids: Sequence[int]) -> Callable[[mx.array], mx.array]:
    """Set the logits of `suppress_ids` to -inf (Gemma 4 never generates `<image|>`/`<audio|>`)."""
    ids = mx.array(list(suppress_ids), dtype=mx.int32)

    def process(logits: mx.array) -> mx.array:
        logits = mx.array(logits)
        logits[..., ids] = NEG_INF
        return logits

    return process
