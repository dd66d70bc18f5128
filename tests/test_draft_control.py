"""The adaptive draft depth: plain decoding when drafting does not pay, long blocks when it does,
and always exactly the target's own tokens. Costs are injected (a cost model or a simulated clock),
so the decisions are free of timing noise."""

from __future__ import annotations

import copy
import itertools

import mlx.core as mx
import numpy as np
import pytest
from tiny import Oracle

from gemma_mlx import ChatSession, SamplingParams, load, make_cache
from gemma_mlx.draft_control import DraftControl
from gemma_mlx.generate import generate_tokens

GPU = lambda k: 1.0 + 0.1 * k  # noqa: E731  a bandwidth-bound verify pass: about one step
CPU = lambda k: 1.0 + 1.0 * k  # noqa: E731  a compute-bound one: k + 1 steps
MAX_DRAFTS = 7
N = 60


@pytest.fixture(scope="module")
def target(checkpoint):
    model, _ = load(checkpoint)
    prompt = [int(i) for i in np.random.default_rng(0).integers(5, 300, size=9)]
    return model, prompt


def run(model, prompt, sampling: SamplingParams, drafter=None, control=None) -> list[int]:
    tokens = generate_tokens(
        model,
        mx.array(prompt, dtype=mx.int32),
        make_cache(model),
        sampling.token_sampler(),
        drafter=drafter,
        draft_block_size=MAX_DRAFTS + 1,
        draft_control=control,
    )
    out = list(itertools.islice(tokens, N))
    tokens.close()
    return out


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.0, seed=3)])
def test_wrong_drafter_ends_on_plain_decoding(target, sampling):
    model, prompt = target
    plain = run(model, prompt, sampling)
    control = DraftControl(MAX_DRAFTS, cost=GPU)
    wrong = Oracle(prompt + plain, model.config.text.vocab_size, wrong=1)
    assert run(model, prompt, sampling, wrong, control) == plain
    late = control.history[len(control.history) // 2 :]
    assert sum(k == 0 for k in late) >= 0.9 * len(late)  # plain, but for a rare probe
    assert control.acceptance < 0.1


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.0, seed=3)])
def test_oracle_drafter_gets_long_blocks(target, sampling):
    """Sampled with a seed, speculative output equals plain output token for token: each token
    is drawn with its own position's key, however rounds group them."""
    model, prompt = target
    plain = run(model, prompt, sampling)
    control = DraftControl(MAX_DRAFTS, cost=GPU)
    oracle = Oracle(prompt + plain, model.config.text.vocab_size)
    assert run(model, prompt, sampling, oracle, control) == plain
    assert control.history.count(MAX_DRAFTS) >= len(control.history) - 3  # all but the warm-up
    assert len(control.history) <= N / 4


def test_a_verify_pass_as_dear_as_its_steps_never_drafts(target):
    """On a compute-bound backend even a perfect drafter cannot win: plain decoding."""
    model, prompt = target
    plain = run(model, prompt, SamplingParams())
    control = DraftControl(MAX_DRAFTS, cost=CPU)
    assert run(model, prompt, SamplingParams(), Oracle(prompt + plain, 512), control) == plain
    assert sum(k > 0 for k in control.history) <= 3  # probes only


def test_default_control_times_rounds_and_keeps_output(target):
    """With the real clock (whatever it decides on this machine) the output is plain decoding's."""
    model, prompt = target
    plain = run(model, prompt, SamplingParams())
    control = DraftControl(MAX_DRAFTS)
    assert run(model, prompt, SamplingParams(), Oracle(prompt + plain, 512, wrong=4), control) == plain
    assert control.history[:4] == [0, 0, 1, 1]  # plain steps and single drafts timed first
    assert set(control.costs) >= {0, 1}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(cost, accept, rounds: int = 200) -> DraftControl:
    """Rounds timed on a simulated clock; `accept(k)` drafts of `k` are accepted."""
    clock = Clock()
    control = DraftControl(MAX_DRAFTS, clock=clock)
    for _ in range(rounds):
        k = control.choose()
        start = clock()
        clock.now += cost(k) * (5 if k not in control.seen else 1)  # a first round warms up
        control.update(k, accept(k), clock() - start)
    return control


def test_measured_costs_drive_the_choice():
    always = simulate(GPU, lambda k: k)
    assert always.history[-50:] == [MAX_DRAFTS] * 50
    assert always.cost(MAX_DRAFTS) == pytest.approx(GPU(MAX_DRAFTS))  # the warm-up round is not counted
    assert always.cost(3) == pytest.approx(GPU(3))  # interpolated between plain steps and full blocks
    never = simulate(GPU, lambda k: 0)
    assert never.history[-50:].count(0) >= 48
    # drafts accepted 2 at a time: blocks of about 2-3 drafts pay, longer ones waste verify work
    some = simulate(lambda k: 1.0 + 0.3 * k, lambda k: min(k, 2))
    assert all(1 <= k < MAX_DRAFTS for k in some.history[-50:])
    cpu = simulate(CPU, lambda k: k)
    assert cpu.history[-100:].count(0) >= 95


def test_probes_back_off_while_drafting_does_not_pay():
    never = simulate(GPU, lambda k: 0, rounds=600)
    probes = [i for i, k in enumerate(never.history) if k][-4:]
    gaps = np.diff(probes)
    assert all(b > a for a, b in itertools.pairwise(gaps))  # the wait doubles


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_drafts=0"):
        DraftControl(0)


def test_plain_rounds_queue_the_next_step_before_handing_out_a_token(target, monkeypatch):
    """When drafting does not pay, a token is handed out only after the step that follows it has
    been queued (as plain decoding does), so the caller's work overlaps the next step."""
    model, prompt = target
    plain = run(model, prompt, SamplingParams())
    control = DraftControl(MAX_DRAFTS, cost=CPU, probe_every=1000, max_probe_every=1000)
    calls, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    tokens = generate_tokens(
        model,
        mx.array(prompt, dtype=mx.int32),
        make_cache(model),
        SamplingParams().token_sampler(),
        drafter=Oracle(prompt + plain, 512),
        draft_block_size=MAX_DRAFTS + 1,
        draft_control=control,
    )
    out = [next(tokens) for _ in range(20)]
    tokens.close()
    assert out == plain[:20] and control.history == [0] * 20
    # the prefill, the prompt's last token, then for each token handed out the step after it
    assert len(calls) == 1 + 1 + 20


def test_a_controller_kept_across_generations_keeps_its_measurements(checkpoint):
    """A chat session drafts with one controller for all its turns: what the first turn measured
    (costs, acceptance) decides the second turn's first round; output stays plain decoding's."""
    model, processor = load(checkpoint)
    plain = ChatSession(model, processor, max_tokens=12)
    first, second = "".join(c.text for c in plain.send("a b")), "".join(c.text for c in plain.send("c"))
    session = ChatSession(
        model, processor, max_tokens=12, drafter=Oracle([], 512, wrong=1), draft_block_size=4
    )
    control = session.draft_control
    assert "".join(c.text for c in session.send("a b")) == first
    rounds = len(control.history)
    assert control.history[:4] == [0, 0, 1, 1] and set(control.costs) >= {0, 1}  # timed in turn one
    assert control.acceptance < 0.5  # drafts were always wrong
    expected = copy.deepcopy(control).choose()  # from turn one's measurements, not a new warm-up
    assert "".join(c.text for c in session.send("c")) == second
    assert session.draft_control is control and control.history[rounds] == expected


def test_a_controller_for_other_blocks_is_refused(target):
    model, prompt = target
    with pytest.raises(ValueError, match="draft_control drafts up to 3 tokens, draft_block_size=8"):
        run(model, prompt, SamplingParams(), Oracle(prompt, 512), DraftControl(3))
