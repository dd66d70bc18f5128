"""The MTP drafter against transformers' assistant model, and speculative decoding that gives
exactly the target's own output."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from reference import randomize
from tiny import TEXT, Oracle, rel_err, save_tokenizer

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


def test_a_drafting_row_joins_a_batch_and_drafts_again_when_alone(pair):
    """Drafting while a row decodes alone, plain steps while another shares the batch (its caches
    merged, then split back with the rings' rollback state), drafting again once it is alone."""
    from gemma_mlx.draft_control import DraftControl
    from gemma_mlx.generate import Batch, prepare_request

    target_dir, _, _, _ = pair
    model, processor = load(target_dir)
    prompt = list(np.random.default_rng(5).integers(5, 300, size=9))
    plain = generate(model, processor, prompt, max_tokens=48)
    other = generate(model, processor, "Hello there", max_tokens=10)
    control = DraftControl(3, cost=lambda k: 1.0 + 0.1 * k)  # drafting pays, whatever the clock says
    batch = Batch(
        model, drafter=Oracle(prompt + plain.tokens, model.config.text.vocab_size), draft_control=control
    )
    a = prepare_request(model, processor, prompt, max_tokens=48, cache=make_cache(model, slack=8))
    b = prepare_request(model, processor, "Hello there", max_tokens=10, cache=make_cache(model, slack=8))
    batch.add(a.row)
    got = {a.row: [], b.row: []}
    drafted = []
    while len(batch):
        if len(got[a.row]) >= 12 and b.row not in got.get("added", []):
            batch.add(b.row)
            got["added"] = [b.row]
            drafted.append(a.row.stats.drafted)
        for row, tokens in batch.step():
            for t in tokens:
                got[row].append(t)
                request = a if row is a.row else b
                if request.output.add(t).finish_reason:
                    batch.remove(row)
                    if row is b.row:
                        drafted.append(a.row.stats.drafted)
                    break
    assert got[a.row] == plain.tokens and got[b.row] == other.tokens
    assert 0 < drafted[0] == drafted[1] < a.row.stats.drafted  # drafts before and after, none while batched
