"""Generation: greedy equals transformers' generate, streaming text, stops, sampling, context."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from tiny import rewrite_config, save_tokenizer

from gemma_mlx import generate, load, make_cache, stream_generate


@pytest.fixture(scope="module")
def chat_model(unified, tmp_path_factory):
    """The tiny unified checkpoint plus a tokenizer and generation config."""
    path, ref = unified
    out = tmp_path_factory.mktemp("with_tokenizer") / "ckpt"
    shutil.copytree(path, out)
    save_tokenizer(out)
    model, processor = load(out)
    return out, model, processor, ref


def test_greedy_matches_transformers_generate(chat_model):
    _, model, processor, ref = chat_model
    prompt = list(np.random.default_rng(0).integers(5, 300, size=12))
    result = generate(model, processor, prompt, max_tokens=48)
    with torch.no_grad():
        expected = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=processor.eos_token_ids,
            pad_token_id=0,
        )[0, 12:].tolist()
    assert result.tokens == expected
    assert result.finish_reason == ("stop" if expected[-1] in processor.eos_token_ids else "length")


def test_stream_text_is_the_decoded_tokens(chat_model):
    _, model, processor, _ = chat_model
    chunks = list(
        stream_generate(model, processor, "The quick brown fox", max_tokens=30, temperature=1.0, seed=3)
    )
    tokens = [c.token for c in chunks if c.token not in processor.eos_token_ids]
    assert "".join(c.text for c in chunks) == processor.tokenizer.decode(tokens)
    assert [c.stats.generation_tokens for c in chunks] == list(range(1, len(chunks) + 1))
    assert chunks[-1].finish_reason in ("stop", "length") and all(
        c.finish_reason is None for c in chunks[:-1]
    )
    assert chunks[0].stats.prompt_tokens == len(processor.encode_prompt("The quick brown fox"))


def test_stop_string_is_not_emitted(chat_model):
    _, model, processor, _ = chat_model
    full = generate(model, processor, "Hello", max_tokens=40, temperature=1.0, seed=5, stop=[])
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    cut = generate(model, processor, "Hello", max_tokens=40, temperature=1.0, seed=5, stop=[stop])
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"


def test_sampling_is_seeded(chat_model):
    _, model, processor, _ = chat_model
    kw = dict(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(model, processor, "fox", seed=1, **kw).tokens
    assert a == generate(model, processor, "fox", seed=1, **kw).tokens
    assert a != generate(model, processor, "fox", seed=2, **kw).tokens


def test_chunked_prefill_and_cache_continuation(chat_model):
    _, model, processor, _ = chat_model
    prompt = list(range(5, 45))
    base = generate(model, processor, prompt, max_tokens=10).tokens
    assert generate(model, processor, prompt, max_tokens=10, prefill_step_size=7).tokens == base
    cache = make_cache(model)
    generate(model, processor, prompt[:25], max_tokens=1, cache=cache)  # caches 25 prompt + 1 token
    for c in cache:
        c.trim(1)
    assert generate(model, processor, prompt[25:], max_tokens=10, cache=cache).tokens == base


def test_chat_messages(chat_model):
    _, model, processor, _ = chat_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ids = processor.encode_prompt(messages)
    assert ids[0] == 2 and processor.tokenizer.token_to_id("<|turn>") in ids
    assert (
        generate(model, processor, messages, max_tokens=5).tokens
        == generate(model, processor, ids, max_tokens=5).tokens
    )


def test_prompt_longer_than_context(chat_model, tmp_path):
    path, _, _, _ = chat_model
    small = tmp_path / "small"
    shutil.copytree(path, small)
    rewrite_config(small, lambda c: c["text_config"].update(max_position_embeddings=32))
    model, processor = load(small)
    with pytest.raises(ValueError, match="context is 32 tokens"):
        generate(model, processor, list(range(5, 45)), max_tokens=4)
    result = generate(model, processor, list(range(5, 25)), max_tokens=100)
    assert len(result.tokens) <= 12 and (
        result.finish_reason == "length" or result.tokens[-1] in processor.eos_token_ids
    )
    with pytest.raises(ValueError, match="empty"):
        generate(model, processor, [], max_tokens=4)
