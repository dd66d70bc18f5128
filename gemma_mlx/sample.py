"""Token sampling as lazy MLX ops (no host syncs, no loops over the vocab).

The filters are transformers' logits warpers, in the order `generate` applies them
(temperature -> top-k -> top-p -> min-p), each keeping at least one token. Top-p after top-k
sorts only the k candidates (Gemma's defaults are top_k=64, top_p=0.95), not the 262144-entry vocab.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

Sampler = Callable[[mx.array, mx.array | None], mx.array]
TokenSampler = Callable[..., mx.array]  # (logits [B, V], start: int | None = None) -> ids [B]
NEG_INF = float("-inf")


def check_sampling_args(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    """Raise ValueError naming the first argument outside its range (`not` form also rejects NaN)."""
    if not 0 <= temperature < math.inf:  # logits / inf are 0 or NaN: the audit got the last id every time
        raise ValueError(f"temperature={temperature}: must be >= 0 and finite (0 = greedy)")
    if not (isinstance(top_k, numbers.Real) and 0 <= top_k < math.inf and int(top_k) == top_k):
        raise ValueError(f"top_k={top_k}: must be an integer >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1] (1 = off)")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p={min_p}: must be in [0, 1) (0 = off)")


def _count(mask: mx.array) -> mx.array:
    return mx.sum(mask, axis=-1, keepdims=True).astype(mx.int32)


def _top_k(x: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """`TopKLogitsWarper`: drop logits below the k-th largest, so ties with it all survive.
    Also returns the k largest values ascending and how many survivors they miss (further
    copies of the k-th value): all that top-p needs to know about the survivors."""
    top = mx.sort(mx.partition(x, -k, axis=-1)[..., -k:], axis=-1)  # O(V) select, O(k log k) sort
    kth = top[..., :1]
    x = mx.where(x < kth, NEG_INF, x)
    return x, top, _count(x == kth) - _count(top == kth)


def _top_p(x: mx.array, p: float, top: mx.array, extra: mx.array | int = 0) -> mx.array:
    """`TopPLogitsWarper` on logits `x` whose survivors, in ascending order, are `extra` copies of
    `top[..., 0]` followed by the sorted `top` (without top-k: `top = sort(x)`, no extras).

    transformers drops the ascending prefix whose cumulative probability is <= 1 - p, always
    keeping the last (most likely) token. Which members of a tied group that prefix splits depends
    on the sort (torch's is not stable); we drop as many as it does, lowest ids first, which is what
    a stable ascending sort gives."""
    extra = mx.array(extra).astype(mx.int32)
    low = top[..., :1]
    # exp(x - max) / sum as torch's softmax computes it, so tied tokens get the very masses (often
    # exact ones, like 1/8) that transformers compares with 1 - p; the extras add to the sum.
    e = mx.exp(top - top[..., -1:])
    probs = e / (mx.sum(e, axis=-1, keepdims=True) + extra * e[..., :1])
    # The j-th extra has cumulative mass j * p0 (up to rounding: a mass equal to 1 - p within float
    # error goes either way, as it does between transformers' CPU and CUDA cumsums), and `top`'s
    # cumulative masses start from extra * p0.
    p0, lim = probs[..., :1], 1 - p
    n_drop = mx.clip(mx.floor(lim / p0), 0, extra).astype(mx.int32)
    n_drop = n_drop + _count(mx.cumsum(probs, axis=-1) + extra * p0 <= lim)
    first = mx.minimum(n_drop, extra + top.shape[-1] - 1)  # the first kept survivor, ascending
    thr = mx.take_along_axis(top, mx.maximum(first - extra, 0), axis=-1)
    below = _count(top < thr) + mx.where(thr > low, extra, 0)  # survivors under the threshold
    tied = x == thr
    rank = mx.cumsum(tied.astype(mx.int32), axis=-1)  # 1-based, by id, within the tied group
    return mx.where((x > thr) | (tied & (rank > first - below)), x, NEG_INF)


def _min_p(x: mx.array, min_p: float) -> mx.array:
    """`MinPLogitsWarper`: drop tokens less likely than min_p times the most likely one (which
    therefore always survives, as min_p < 1)."""
    probs = mx.softmax(x, axis=-1)
    return mx.where(probs < min_p * mx.max(probs, axis=-1, keepdims=True), NEG_INF, x)


def filter_logits(
    logits: mx.array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> mx.array:
    """float32 logits `[..., V]` after temperature, top-k, top-p and min-p, dropped tokens at -inf;
    `softmax` of the result is the distribution `make_sampler` draws from."""
    check_sampling_args(temperature, top_k, top_p, min_p)
    if temperature == 0:
        raise ValueError("temperature=0 is greedy decoding: there is nothing to filter")
    x = logits.astype(mx.float32) / temperature  # divide as transformers does (not * 1/T)
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        x, top, extra = _top_k(x, top_k)
        if top_p < 1:
            x = _top_p(x, top_p, top, extra)
    elif top_p < 1:
        x = _top_p(x, top_p, mx.sort(x, axis=-1))
    if min_p > 0:
        x = _min_p(x, min_p)
    return x


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Sampler:
    """Return `sample(logits [B, V], key) -> token ids [B]` (uint32). temperature 0 is greedy
    argmax and ignores the filters and the key; otherwise the filters of `filter_logits`, then
    `mx.random.categorical` with `key` (the caller splits a fresh one per step)."""
    check_sampling_args(temperature, top_k, top_p, min_p)
    if temperature == 0:
        return lambda logits, key=None: mx.argmax(logits, axis=-1)

    def sample(logits: mx.array, key: mx.array | None = None) -> mx.array:
        return mx.random.categorical(filter_logits(logits, temperature, top_k, top_p, min_p), key=key)

    return sample


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens, shared by the API, the chat session, the CLI and the server.
    temperature 0 is greedy; `top_k` 0, `top_p` 1 and `min_p` 0 switch a filter off. `seed` may be
    any integer: it is reduced modulo 2**64, the range of MLX's PRNG key; None draws a fresh one."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.min_p)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r}: must be an integer")

    def token_sampler(self, suppress_ids: Sequence[int] = ()) -> TokenSampler:
        """`sample(logits [B, V], start=None) -> ids [B]`, lazily, suppressed ids never drawn. Row
        `i` is generated token number `start + i` (default: right after the previous call's rows)
        and is drawn with a PRNG key of its own made from the seed and that number, so a token
        depends only on the seed, its number and its logits: the same seed gives the same tokens,
        however the tokens are grouped into calls (plain steps or speculative verify passes)."""
        sampler = make_sampler(self.temperature, self.top_k, self.top_p, self.min_p)
        process = make_logits_processor(suppress_ids) if suppress_ids else None
        seed = secrets.randbits(64) if self.seed is None else self.seed % 2**64
        greedy, following = self.temperature == 0, 0

        def key(number: int) -> mx.array:
            digest = hashlib.blake2b(f"{seed}:{number}".encode(), digest_size=8).digest()
            return mx.random.key(int.from_bytes(digest, "little"))

        def sample(logits: mx.array, start: int | None = None) -> mx.array:
            nonlocal following
            start = following if start is None else start
            following = start + logits.shape[0]
            if process is not None:
                logits = process(logits)
            if greedy:
                return sampler(logits)
            rows = [sampler(logits[i : i + 1], key(start + i)) for i in range(logits.shape[0])]
            return rows[0] if len(rows) == 1 else mx.concatenate(rows)

        return sample


def make_logits_processor(suppress_ids: Sequence[int]) -> Callable[[mx.array], mx.array]:
    """Return `process(logits [..., V])` with `suppress_ids` at -inf (Gemma 4 never generates
    `<image|>`/`<audio|>`); the input array is left as it is."""
    ids = mx.array(sorted(set(suppress_ids)), dtype=mx.int32)  # built once, not per step

    def process(logits: mx.array) -> mx.array:
        if ids.size == 0:
            return logits
        out = mx.array(logits)  # a new handle on the same graph node: the scatter rebinds only it
        out[..., ids] = NEG_INF
        return out

    return process
