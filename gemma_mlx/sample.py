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
from collections import deque
from collections.abc import Callable, Mapping, Sequence
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
    # OpenAI's penalties on the tokens generated so far: logit - frequency * count - presence * (count > 0)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # vLLM's / llama.cpp's: a token of the prompt or the output has its logit divided by the penalty
    # when positive, multiplied when negative (1 = off)
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None  # added to the logits of those ids (-100: banned)

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.min_p)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r}: must be an integer")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [-2, 2]")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 = off)")
        for k, v in (self.logit_bias or {}).items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 0 or not -100 <= v <= 100:
                raise ValueError(f"logit_bias: {k!r}: {v!r}: expected a token id and a bias in [-100, 100]")

    @property
    def penalized(self) -> bool:
        """Whether a token's logits depend on the tokens before it (not only on the model)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1)

    def token_sampler(
        self, suppress_ids: Sequence[int] = (), prompt_ids: Sequence[int] = (), logprobs: int | None = None
    ) -> TokenSampler:
        """`sample(logits [B, V], start=None, mask=None) -> ids [B]`, lazily, suppressed ids never
        drawn, `mask` (packed int32 words, see `gemma_mlx.constrain`) forbidding tokens. Row `i` is
        generated token number `start + i` (default: right after the previous call's rows) and is
        drawn with a PRNG key of its own made from the seed and that number, so a token depends
        only on the seed, its number and its logits: the same seed gives the same tokens, however
        the tokens are grouped into calls (plain steps or speculative verify passes).

        Before sampling: `logit_bias`, then the penalties (counting the tokens this sampler drew,
        and `prompt_ids` for the repetition penalty; one row per call then), suppression, the mask.
        With `logprobs` (0: the chosen token's only, n: also the n most likely), each call appends
        `(chosen [B], top ids [B, n], top logprobs [B, n])` to `sample.logprobs`, log-softmax of the
        model's own logits (before any of the above)."""
        sampler = make_sampler(self.temperature, self.top_k, self.top_p, self.min_p)
        process = make_logits_processor(suppress_ids) if suppress_ids else None
        seed = secrets.randbits(64) if self.seed is None else self.seed % 2**64
        greedy, following = self.temperature == 0, 0
        penalties = _Penalties(self, prompt_ids) if self.penalized else None
        bias = dict(self.logit_bias or {})
        dense: list[mx.array] = []

        def key(number: int) -> mx.array:
            digest = hashlib.blake2b(f"{seed}:{number}".encode(), digest_size=8).digest()
            return mx.random.key(int.from_bytes(digest, "little"))

        def sample(logits: mx.array, start: int | None = None, mask: mx.array | None = None) -> mx.array:
            nonlocal following
            start = following if start is None else start
            following = start + logits.shape[0]
            raw = logits
            if bias:
                if not dense:
                    dense.append(_dense_bias(bias, logits.shape[-1]))
                logits = logits.astype(mx.float32) + dense[0]
            if penalties is not None:
                logits = penalties.apply(logits)
            if process is not None:
                logits = process(logits)
            if mask is not None:
                from .constrain import apply_mask

                logits = apply_mask(logits, mask)
            if greedy:
                ids = sampler(logits)
            else:
                rows = [sampler(logits[i : i + 1], key(start + i)) for i in range(logits.shape[0])]
                ids = rows[0] if len(rows) == 1 else mx.concatenate(rows)
            if penalties is not None:
                penalties.count(ids)
            if logprobs is not None:
                sample.logprobs.append(token_logprobs(raw, ids, logprobs))
            return ids

        sample.logprobs = deque()
        return sample


def token_logprobs(logits: mx.array, ids: mx.array, top: int) -> tuple[mx.array, mx.array, mx.array]:
    """log-softmax of `logits [B, V]` (float32) at `ids [B]`, and the `top` largest (ids, values)."""
    lp = logits.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(lp, ids.reshape(-1, 1).astype(mx.int32), axis=-1)[:, 0]
    if top <= 0:
        empty = mx.zeros((lp.shape[0], 0))
        return chosen, empty.astype(mx.int32), empty
    best = mx.argpartition(-lp, top - 1, axis=-1)[:, :top]
    vals = mx.take_along_axis(lp, best, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    return chosen, mx.take_along_axis(best, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)


def _dense_bias(bias: Mapping[int, float], vocab: int) -> mx.array:
    out = [0.0] * vocab
    for i, v in bias.items():
        if i >= vocab:
            raise ValueError(f"logit_bias: token id {i} is outside the vocabulary (0 .. {vocab - 1})")
        out[i] = float(v)
    return mx.array(out, dtype=mx.float32)


class _Penalties:
    """Counts of the tokens drawn so far, kept on the device (no host sync), and the penalties."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]):
        self.params, self.prompt_ids = params, list(prompt_ids)
        self.counts: mx.array | None = None
        self.seen: mx.array | None = None  # prompt tokens, for the repetition penalty

    def apply(self, logits: mx.array) -> mx.array:
        p, vocab = self.params, logits.shape[-1]
        if self.counts is None:
            self.counts = mx.zeros((vocab,), mx.float32)
            seen = mx.zeros((vocab,), mx.bool_)
            ids = [i for i in self.prompt_ids if 0 <= i < vocab]
            if ids and p.repetition_penalty != 1:
                seen[mx.array(ids)] = True
            self.seen = seen
        x = logits.astype(mx.float32)
        present = self.counts > 0
        if p.repetition_penalty != 1:
            r = p.repetition_penalty
            x = mx.where(present | self.seen, mx.where(x > 0, x / r, x * r), x)
        if p.frequency_penalty:
            x = x - p.frequency_penalty * self.counts
        if p.presence_penalty:
            x = x - p.presence_penalty * present.astype(mx.float32)
        return x

    def count(self, ids: mx.array) -> None:
        self.counts = self.counts.at[ids.reshape(-1).astype(mx.int32)].add(1.0)


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
