"""The MTP drafter against transformers' assistant model, and speculative decoding that gives
exactly the target's own output."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from reference import randomize
from tiny import TEXT, rel_err, save_tokenizer

from gemma_mlx import Drafter, SamplingParams, generate, load, load_drafter, make_cache


@pytest.fixture(scope="module")
def pair(causal, tmp_path_factory):
    """(target dir, target reference, drafter dir, drafter reference): the drafter reads the
    target's K/V (heads and head dims match), window 12."""
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM

    d = tmp_path_factory.mktemp("mtp")
    target = d / "target"
    shutil.copytree(causal[0], target)
    save_tokenizer(target)
    layers = ["sliding_attention"] * 3 + ["full_attention"]
    text = {
        **TEXT,
        "num_hidden_layers": 4,
        "num_kv_shared_layers": 4,
        "layer_types": layers,
        "final_logit_softcapping": None,
    }
    torch.manual_seed(3)
    assistant = Gemma4UnifiedAssistantForCausalLM(
        Gemma4UnifiedAssistantConfig(text_config=text, backbone_hidden_size=128)
    )
    randomize(assistant)
    assistant = assistant.float().eval()
    assistant.save_pretrained(d / "drafter")
    return target, causal[1], d / "drafter", assistant


@pytest.mark.parametrize("length", [7, 30])  # shorter and longer than the window
def test_draft_step_matches_transformers(pair, length):
    target_dir, ref, drafter_dir, assistant = pair
    target, _ = load(target_dir)
    drafter = load_drafter(drafter_dir)
    ids = np.random.default_rng(length).integers(5, 512, size=(1, length))
    with torch.no_grad():
        r = ref(input_ids=torch.tensor(ids), output_hidden_states=True, return_shared_kv_states=True)
        t0 = int(r.logits[0, -1].argmax())
        emb = ref.model.embed_tokens(torch.tensor([[t0]]))
        expected = assistant(
            inputs_embeds=torch.cat([emb, r.hidden_states[-1][:, -1:]], -1),
            position_ids=torch.tensor([[length]]),
            shared_kv_states=r.shared_kv_states,
        )
    cache = make_cache(target)
    out = target.forward(mx.array(ids), cache)
    logits, hidden = drafter(
        target.language_model.embed(mx.array([[t0]])),
        out.hidden[:, -1:],
        Drafter.shared_kv(target, cache, length),
        length,
    )
    assert rel_err(logits, expected.logits.numpy()) <= 1e-4
    assert rel_err(hidden, expected.last_hidden_state.numpy()) <= 1e-4


class Oracle:
    """A drafter that knows the target's greedy continuation (and errs on every `wrong`-th
    draft), to drive full and partial acceptance through the rollback paths."""

    def __init__(self, sequence: list[int], vocab: int, wrong: int = 0):
        self.sequence, self.vocab, self.wrong = sequence, vocab, wrong
        self.calls = 0

    def draft(self, target, cache, token, hidden, n):
        position = cache[0].offset  # `token`'s position: the caches hold everything before it
        drafts = []
        for step in range(n):
            index = position + 1 + step
            self.calls += 1
            draft = self.sequence[index] if index < len(self.sequence) else 0
            if self.wrong and self.calls % self.wrong == 0:
                draft = (draft + 1) % self.vocab
            drafts.append(draft)
        return mx.array([drafts])


@pytest.mark.parametrize(("drafter_kind", "block"), [("real", 4), ("oracle", 4), ("oracle", 6), ("flaky", 5)])
def test_speculative_greedy_equals_plain(pair, drafter_kind, block):
    target_dir, _, drafter_dir, _ = pair
    model, processor = load(target_dir)
    prompt = list(np.random.default_rng(0).integers(5, 300, size=9))
    plain = generate(model, processor, prompt, max_tokens=40)
    vocab = model.config.text.vocab_size
    drafter = {
        "real": lambda: load_drafter(drafter_dir),
        "oracle": lambda: Oracle(prompt + plain.tokens, vocab),
        "flaky": lambda: Oracle(prompt + plain.tokens, vocab, wrong=3),
    }[drafter_kind]()
    cache = make_cache(model, slack=8)
    spec = generate(
        model, processor, prompt, max_tokens=40, drafter=drafter, draft_block_size=block, cache=cache
    )
    assert spec.tokens == plain.tokens
    stats = spec.stats
    assert stats.drafted > 0 and 0 <= stats.accepted <= stats.drafted
    if drafter_kind == "oracle":
        assert stats.accepted >= 0.8 * stats.drafted  # all but the last round's overshoot
    if drafter_kind == "flaky":
        assert 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_speculative_greedy_equals_plain_with_a_quantized_cache(pair, kv_bits):
    """Drafts read the quantized K/V; rejected ones are trimmed from quantized rings."""
    target_dir, _, drafter_dir, _ = pair
    model, processor = load(target_dir)
    prompt = list(np.random.default_rng(1).integers(5, 300, size=9))
    kv = dict(kv_bits=kv_bits, kv_group_size=32)
    plain = generate(model, processor, prompt, max_tokens=40, **kv)
    cache = make_cache(model, slack=8, **kv)
    drafter = load_drafter(drafter_dir)
    spec = generate(model, processor, prompt, max_tokens=40, drafter=drafter, draft_block_size=4, cache=cache)
    assert spec.tokens == plain.tokens and spec.stats.drafted > 0


def test_speculative_sampling_is_seeded_and_block_checked(pair):
    target_dir, _, drafter_dir, _ = pair
    model, processor = load(target_dir)
    drafter = load_drafter(drafter_dir)
    kw = dict(max_tokens=20, temperature=1.0, top_k=50, drafter=drafter, draft_block_size=3)
    a = generate(model, processor, "Hello", seed=4, **kw).tokens
    assert a == generate(model, processor, "Hello", seed=4, **kw).tokens and len(a) == 20
    with pytest.raises(ValueError, match="draft block size 200"):
        generate(model, processor, "Hello", max_tokens=5, drafter=drafter, draft_block_size=200)


def test_chat_and_cli_with_drafter(pair):
    from typer.testing import CliRunner

    from gemma_mlx.chat import ChatSession
    from gemma_mlx.cli.app import app

    target_dir, _, drafter_dir, _ = pair
    model, processor = load(target_dir)
    plain = ChatSession(model, processor, max_tokens=12, sampling=SamplingParams(temperature=0.0))
    spec = ChatSession(
        model,
        processor,
        max_tokens=12,
        sampling=SamplingParams(temperature=0.0),
        drafter=load_drafter(drafter_dir),
        draft_block_size=3,
    )
    for text in ("Hello there", "The quick brown fox"):
        a = "".join(c.text for c in plain.send(text))
        b = "".join(c.text for c in spec.send(text))
        assert a == b and spec.tokens == plain.tokens
        assert spec.cache[0].offset == len(spec.tokens) and spec.stats.drafted > 0
    assert spec.stats.cached_prompt_tokens > 0
    runner = CliRunner()
    args = ["generate", "--model", str(target_dir), "-n", "10", "The quick brown fox"]
    without = runner.invoke(app, args)
    with_draft = runner.invoke(app, [*args, "--draft", str(drafter_dir), "--draft-block-size", "3"])
    assert without.exit_code == with_draft.exit_code == 0
    assert with_draft.stdout == without.stdout and "drafts accepted" in with_draft.stderr
