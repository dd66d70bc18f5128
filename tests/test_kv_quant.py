"""Quantized KV caches (8 and 4 bits) for global layers and sliding-window rings: close to the
float cache, exact rollback after the ring wrapped, snapshots that stay snapshots."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny import VOCAB, rel_err

from gemma_mlx import make_cache
from gemma_mlx.cache import QuantizedKV, RingKVCache
from gemma_mlx.checkpoint import load_model

# max |logit diff| / max |logit| against the float cache over 40 tokens (20 prefilled, 20 decoded)
# on the tiny reference model, measured (MLX 0.32.4 CPU): 8-bit 0.0029 global only / 0.0145 all
# layers; 4-bit 0.076 / 0.21. Bounds: about twice that.
BOUNDS = {(8, False): 0.006, (8, True): 0.03, (4, False): 0.15, (4, True): 0.4}


@pytest.mark.parametrize(("bits", "rings"), list(BOUNDS))
def test_close_to_the_float_cache(unified, bits, rings):
    model = load_model(unified[0])
    ids = mx.array(np.random.default_rng(0).integers(5, VOCAB, size=(1, 40)))
    full = model(ids)
    cache = make_cache(model, kv_bits=bits, kv_group_size=32, quantize_rings=rings)
    steps = [model(ids[:, :20], cache)] + [model(ids[:, i : i + 1], cache) for i in range(20, 40)]
    assert isinstance(cache[-1].keys, QuantizedKV) and isinstance(cache[0].keys, QuantizedKV) == rings
    err = rel_err(mx.concatenate(steps, axis=1), full)
    assert 0 < err <= BOUNDS[bits, rings]
    float_cache = make_cache(model)
    model(ids, float_cache)
    assert sum(c.nbytes for c in cache) < sum(c.nbytes for c in float_cache)


def test_rollback_after_wrap_equals_fresh_run(unified):
    """The speculative-decoding pattern of tests/test_cache.py with 4-bit rings and global caches."""
    model = load_model(unified[0])
    rng = np.random.default_rng(0)
    seq, garbage = rng.integers(5, VOCAB, size=60), rng.integers(5, VOCAB, size=4)
    kw = dict(slack=4, kv_bits=4, kv_group_size=32)
    expected = model(mx.array(seq[None]), make_cache(model, **kw))
    cache = make_cache(model, **kw)
    model(mx.array(seq[None, :30]), cache)
    for t in range(30, 60):
        if t % 5 == 0:
            block = 1 + t % 3
            model(mx.array(garbage[None, :block]), cache)
            model(mx.array(garbage[None, 3:]), cache)
            for c in cache:
                c.trim(1)
                c.trim(block)
        out = model(mx.array(seq[None, t : t + 1]), cache)
        assert rel_err(out[0, 0], expected[0, t]) <= 1e-5, t


@pytest.mark.parametrize("bits", [None, 8])
def test_state_is_a_snapshot_after_the_ring_wrapped(bits):
    """A saved `state` is not changed by later in-place writes (the server's prefix cache keeps them)."""
    ring = RingKVCache(window=4, slack=2, quant=None if bits is None else (bits, 32))
    kv = lambda p: (mx.full((1, 1, 1, 32), float(p)), mx.full((1, 1, 1, 32), -float(p)))  # noqa: E731
    for p in range(8):
        ring.update_and_fetch(*kv(p))
    saved = ring.state
    before = np.array(ring.shared_view(8)[0] if bits is None else saved[0].packed)
    for p in range(8, 14):  # wraps again over every slot
        ring.update_and_fetch(*kv(p))
    np.testing.assert_array_equal(np.array(saved[0] if bits is None else saved[0].packed), before)
    ring.state = saved
    assert ring.offset == 8


def test_arguments_are_checked(unified):
    model = load_model(unified[0])
    with pytest.raises(ValueError, match="kv_bits=3"):
        make_cache(model, kv_bits=3)
    with pytest.raises(ValueError, match="does not divide the head dimension 32"):
        make_cache(model, kv_bits=8, kv_group_size=64)


def test_cache_bytes_of_the_real_12b():
    """8 global layers x (K + V) x 1 head x 512 dims per token; 40 rings of 1024 + 128 slots x 8 heads
    x 256 dims: bf16 2 bytes per element, 8-bit 1 + 4/64 (bf16 scale and bias per 64), 4-bit 0.5 + 4/64."""
    import json
    from pathlib import Path

    from gemma_mlx.config import parse_config
    from gemma_mlx.footprint import kv_cache_bytes

    config = parse_config(
        json.loads((Path(__file__).parent / "data" / "gemma-4-12b-config.json").read_text())
    )
    for bits, element in ((None, 2), (8, 1 + 4 / 64), (4, 0.5 + 4 / 64)):
        per_token, rings = kv_cache_bytes(config.text, 262144, kv_bits=bits)
        assert per_token == round(8 * 2 * 512 * element)
        assert rings == round(40 * 2 * 8 * 256 * element * (1024 + 128))
    per_token, rings = kv_cache_bytes(config.text, 262144, kv_bits=8)
    assert (per_token * 262144 + rings) / 1e9 < 2.5  # 256K of context in 2.48 GB (4.67 GB in bf16)
