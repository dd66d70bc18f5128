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
# CPU): 0.0 in float32 for both chunkings. With 8-bit caches the quantized matmul kernel changes
# with the chunk length, and so does the rounding, which this random tiny model amplifies as much
# as it amplifies the quantization itself (8-bit vs float32 caches: 0.28-0.48): over three images
# the chunked-vs-unchunked difference was 0 to 2.5e-3, at most 0.9 % of the quantization's own
# effect. So the 8-bit bound is relative to that effect.
FLOAT_BOUND, QUANTIZED_SHARE = 1e-5, 0.02


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
    bound = FLOAT_BOUND
    if kv_bits is not None:  # the share of the quantization's own effect (see QUANTIZED_SHARE)
        cache = make_cache(model)
        prefill(model, ids[:-1], cache, media=inputs.model_kwargs())
        bound = QUANTIZED_SHARE * rel_err(logits[0], model(ids[None, -1:], cache))
    assert rel_err(logits[1], logits[0]) <= bound and rel_err(logits[2], logits[0]) <= bound
