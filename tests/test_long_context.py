"""Long prompts: chunked prefill of a prompt far longer than the sliding window, with an image and
an audio clip inside it, equals one unchunked prefill (float and quantized caches)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny import rel_err

from gemma_mlx import load, make_cache
from gemma_mlx.generate import prefill

# max |diff| / max |logit| of the next-token logits, chunked vs unchunked, measured (MLX 0.32.4
# CPU): 0.0 in float32 for both chunkings; 8-bit caches 0.0 (16-token chunks) and 5.7e-5 (7-token
# chunks: the quantized matmul kernel changes with the chunk length, so does the rounding)
BOUND = {None: 1e-5, 8: 2e-4}


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_chunked_prefill_with_media_equals_one_pass(checkpoint, kv_bits):
    model, processor = load(checkpoint)
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    audio = (np.sin(np.arange(8000) / 7) * 0.3).astype(np.float32)
    words = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    prompt = f"{words} <|image|> {words} <|audio|> {words}"
    inputs = processor.prepare(prompt, [image], [(audio, 16000)], max_soft_tokens=70)
    ids = mx.array(inputs.ids)
    assert len(inputs.ids) > 10 * model.config.text.sliding_window
    logits = []
    for step in (10_000, 16, 7):  # one chunk; chunks that cut the image block are extended
        cache = make_cache(model, kv_bits=kv_bits, kv_group_size=32)
        prefill(model, ids[:-1], cache, media=inputs.model_kwargs(), step=step)
        assert all(c.offset == len(inputs.ids) - 1 for c in cache)
        logits.append(model(ids[None, -1:], cache))
    assert rel_err(logits[1], logits[0]) <= BOUND[kv_bits] and rel_err(logits[2], logits[0]) <= BOUND[kv_bits]
