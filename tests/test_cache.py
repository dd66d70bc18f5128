"""KV caches: ring positions, growth, rollback after the ring has wrapped, state save/restore."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny import VOCAB, rel_err

from gemma_mlx import make_cache
from gemma_mlx.cache import KVCache, RingKVCache
from gemma_mlx.checkpoint import load_model


def kv(positions) -> tuple[mx.array, mx.array]:
    """Keys whose single feature is their position, so fetched keys reveal where they came from."""
    p = mx.array(list(positions), dtype=mx.float32).reshape(1, 1, -1, 1)
    return p, -p


@pytest.mark.parametrize("chunks", [[1] * 30, [5, 1, 1, 9, 1, 13], [30], [3, 17, 1, 1, 8]])
def test_ring_returns_what_positions_say(chunks):
    ring, start = RingKVCache(window=8, slack=3), 0
    for n in chunks:
        expected_positions = np.array(ring.key_positions(n))
        k, v = ring.update_and_fetch(*kv(range(start, start + n)))
        keys = np.array(k).reshape(-1)
        valid = expected_positions >= 0
        np.testing.assert_array_equal(keys[valid], expected_positions[valid])
        np.testing.assert_array_equal(np.array(v).reshape(-1)[valid], -expected_positions[valid])
        # every key a query of this chunk may see within the window is present
        needed = set(range(max(0, start - 7), start + n))
        assert needed <= set(expected_positions[valid].tolist())
        start += n
    assert ring.offset == start and ring.keys.shape[2] == 11


def test_ring_trim_limits():
    ring = RingKVCache(window=8, slack=3)
    ring.update_and_fetch(*kv(range(20)))
    assert ring.max_trim == 3
    with pytest.raises(ValueError, match="rollback slack"):
        ring.trim(4)
    assert ring.trim(2) == 2 and ring.max_trim == 1  # rollbacks add up against the slack
    with pytest.raises(ValueError, match="rollback slack"):
        ring.trim(2)
    assert ring.trim(1) == 1 and ring.offset == 17
    # after the trim, the next token sees exactly positions 10..17 within the window
    pos = np.array(ring.key_positions(1))
    ring.update_and_fetch(*kv([17]))
    live = sorted(p for p in pos.tolist() if p > 17 - 8)
    assert live == list(range(10, 18))


def test_kv_cache_grows_in_steps(monkeypatch):
    monkeypatch.setattr(KVCache, "step", 4)
    c = KVCache()
    for i in range(0, 11, 1):
        k, _ = c.update_and_fetch(*kv([i]))
    np.testing.assert_array_equal(np.array(k).reshape(-1), np.arange(11))
    assert c.keys.shape[2] == 12 and c.trim(3) == 3 and c.offset == 8
    k, _ = c.update_and_fetch(*kv(range(100, 107)))
    np.testing.assert_array_equal(np.array(k).reshape(-1), list(range(8)) + list(range(100, 107)))
    assert c.nbytes == 2 * c.keys.size * 4


def test_rollback_after_wrap_equals_fresh_run(unified):
    """Speculative decoding's pattern: accept a prefix, write a block of drafts, reject some,
    trim them. After the ring has wrapped several times, continuing from the trimmed cache must
    give the same logits as a run that never saw the rejected tokens."""
    path, _ = unified
    model = load_model(path)
    rng = np.random.default_rng(0)
    seq = rng.integers(5, VOCAB, size=60)
    garbage = rng.integers(5, VOCAB, size=4)
    clean = make_cache(model, slack=4)
    expected = model(mx.array(seq[None]), clean)

    cache = make_cache(model, slack=4)
    model(mx.array(seq[None, :30]), cache)
    for t in range(30, 60):  # one token at a time; every 5th step a rejected 4-token block
        if t % 5 == 0:  # a rejected block (1-3 tokens) plus a rejected single token: 2-4 <= slack
            block = 1 + t % 3
            model(mx.array(garbage[None, :block]), cache)
            model(mx.array(garbage[None, 3:]), cache)
            for c in cache:
                c.trim(1)
                c.trim(block)
        out = model(mx.array(seq[None, t : t + 1]), cache)
        assert rel_err(out[0, 0], expected[0, t]) <= 1e-5, t
    assert all(c.offset == 60 for c in cache)


def test_state_save_and_restore(checkpoint):
    path = checkpoint
    model = load_model(path)
    ids = mx.array(np.random.default_rng(1).integers(5, VOCAB, size=(1, 25)))
    cache = make_cache(model)
    model(ids[:, :20], cache)
    saved = [c.state for c in cache]
    first = model(ids[:, 20:], cache)
    for c, s in zip(cache, saved, strict=True):
        c.state = s
    assert all(c.offset == 20 for c in cache)
    assert rel_err(model(ids[:, 20:], cache), first) == 0.0
    assert sum(c.nbytes for c in cache) > 0
