"""The sampler against transformers' logits warpers: kept sets, probabilities, tie handling,
sampling frequencies, seeding, suppression and argument checks."""

from __future__ import annotations

from unittest import mock

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers.generation import logits_process as lp

from gemma_mlx.sample import filter_logits, make_logits_processor, make_sampler

PARAMS = [  # (temperature, top_k, top_p, min_p)
    (1.0, 50, 1.0, 0.0),
    (0.7, 0, 0.9, 0.0),
    (1.3, 0, 1.0, 0.1),
    (1.0, 40, 0.8, 0.05),
    (0.5, 5, 0.5, 0.2),
    (1.0, 0, 0.3, 0.0),
    (2.0, 64, 0.95, 0.0),  # Gemma's generation_config (at a higher temperature)
    (1.0, 1, 0.9, 0.0),
    (1.0, 100_000, 0.99, 0.02),  # top_k beyond the vocab is a no-op
    (0.8, 20, 0.999, 0.3),
]


def hf_filtered(
    x: np.ndarray, temperature, top_k, top_p, min_p, order=("k", "p"), stable=False
) -> np.ndarray:
    """transformers' warpers in `generate`'s order (`_get_logits_processor`); `stable` makes the
    top-p sort stable, so that which tied tokens it drops is defined."""
    warpers = {
        "k": lp.TopKLogitsWarper(top_k) if top_k else None,
        "p": lp.TopPLogitsWarper(top_p) if top_p < 1 else None,
    }
    procs = [lp.TemperatureLogitsWarper(temperature), *(warpers[o] for o in order if warpers[o])]
    procs += [lp.MinPLogitsWarper(min_p)] if min_p else []
    sort = torch.sort
    with mock.patch.object(
        lp.torch, "sort", lambda *a, **kw: sort(*a, **kw, stable=True) if stable else sort(*a, **kw)
    ):
        return lp.LogitsProcessorList(procs)(None, torch.tensor(x)).numpy()


def ours(x: np.ndarray, *params) -> np.ndarray:
    return np.array(filter_logits(mx.array(x), *params))


def cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    peaked = rng.normal(size=(2, 500)).astype(np.float32)
    peaked[:, 7] += 15
    suppressed = rng.normal(size=(2, 300)).astype(np.float32) * 2
    suppressed[:, [3, 250]] = -np.inf
    return {
        "normal": rng.normal(size=(3, 1000)).astype(np.float32) * 3,
        "wide": rng.standard_t(3, size=(1, 8000)).astype(np.float32) * 4,
        "peaked": peaked,
        "suppressed": suppressed,
        "tiny_vocab": rng.normal(size=(4, 7)).astype(np.float32),
        # bf16-like coarse logits: ties everywhere, including at the top-k and top-p boundaries
        "ties": np.round(rng.normal(size=(4, 600)) * 2).astype(np.float32),
        "tied_top": np.where(np.arange(400) < 8, 3.0, rng.normal(size=(2, 400)) - 4).astype(np.float32),
    }


@pytest.mark.parametrize("params", PARAMS)
def test_filters_match_transformers(params):
    """Same surviving set as transformers (exactly, ties included, given a stable sort for top-p)
    and the same renormalised probabilities."""
    for name, x in cases().items():
        got, ref = ours(x, *params), hf_filtered(x, *params, stable=True)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(ref), err_msg=name)
        p_got = np.array(mx.softmax(mx.array(got), axis=-1))
        np.testing.assert_allclose(
            p_got, torch.softmax(torch.tensor(ref), -1).numpy(), atol=1e-5, err_msg=name
        )


def test_ties_match_transformers_default_sort():
    """With torch's default (unstable) sort, which tied tokens top-p drops is arbitrary; we drop as
    many as it does, so the kept values (and the distribution over them) are the same."""
    x = cases()["ties"]
    for params in [(1.0, 0, 0.8, 0.0), (1.0, 30, 0.7, 0.1), (0.6, 0, 0.5, 0.0), (1.0, 200, 0.9, 0.0)]:
        got, ref = ours(x, *params), hf_filtered(x, *params)
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_array_equal(np.sort(g[~np.isinf(g)]), np.sort(r[~np.isinf(r)]))


def test_top_p_splits_a_tie_group_beyond_top_k():
    """8 tokens tie for the top, top_k=3 keeps all 8 (ties with the 3rd survive), and top_p=0.5
    needs 4 of them (cumulative 4/8 is not > 0.5): the 4 highest ids stay, as a stable sort gives.
    Most of the tied group lies outside the k candidates top-p sorts, so this checks the extras."""
    x = np.full((1, 50), -3.0, np.float32)
    x[0, 10:18] = 2.0
    kept = np.nonzero(~np.isinf(ours(x, 1.0, 3, 0.5, 0.0)[0]))[0]
    assert kept.tolist() == [14, 15, 16, 17]
    np.testing.assert_array_equal(
        np.isinf(ours(x, 1.0, 3, 0.5, 0.0)), np.isinf(hf_filtered(x, 1.0, 3, 0.5, 0.0, stable=True))
    )


def test_order_matters_so_the_parity_test_can_fail():
    """top-k then top-p (transformers' order) and the reverse keep different sets here, so the
    parity test above would catch the order being swapped; likewise ignoring top-k."""
    x = np.random.default_rng(3).normal(size=(1, 200)).astype(np.float32) * 0.5  # flat: top-p keeps many
    params = (1.0, 20, 0.7, 0.0)
    got = np.isinf(ours(x, *params))
    assert np.array_equal(got, np.isinf(hf_filtered(x, *params)))
    assert not np.array_equal(got, np.isinf(hf_filtered(x, *params, order=("p", "k"))))
    assert not np.array_equal(got, np.isinf(hf_filtered(x, 1.0, 0, 0.7, 0.0)))


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's statistic; a count where `probs` is 0 makes it infinite."""
    seen = counts > 0
    if (seen & (probs == 0)).any():
        return float("inf")
    live = probs > 0
    expected = probs[live] * counts.sum()
    return float(((counts[live] - expected) ** 2 / expected).sum())


def test_sampling_frequencies_follow_the_filtered_distribution():
    """20000 draws (one batched call: every row gets its own noise) fit the filtered distribution,
    and the same statistic rejects the distributions of top-k ignored or top-k/top-p swapped."""
    x = np.random.default_rng(2).normal(size=(1, 64)).astype(np.float32) * 0.7
    params, n = (1.0, 12, 0.8, 0.0), 20_000
    probs = torch.softmax(torch.tensor(hf_filtered(x, *params)), -1).numpy()[0]
    draws = np.array(make_sampler(*params)(mx.broadcast_to(mx.array(x), (n, 64)), mx.random.key(0)))
    counts = np.bincount(draws, minlength=64)
    df = (probs > 0).sum() - 1
    bound = df + 6 * np.sqrt(2 * df)  # ~6 sigma of chi2(df): stable, yet far below the alternatives
    assert chi_square(counts, probs) < bound
    for wrong in [hf_filtered(x, 1.0, 0, 0.8, 0.0), hf_filtered(x, *params, order=("p", "k"))]:
        assert chi_square(counts, torch.softmax(torch.tensor(wrong), -1).numpy()[0]) > 10 * bound


def test_disabled_filters_are_plain_categorical():
    """temperature alone (top_k 0, top_p 1, min_p 0) draws exactly what `categorical` draws."""
    x, key = mx.random.normal((3, 1000), key=mx.random.key(9)) * 2, mx.random.key(5)
    got = make_sampler(0.7)(x, key)
    assert np.array_equal(np.array(got), np.array(mx.random.categorical(x / 0.7, key=key)))


def test_greedy_is_argmax_and_ignores_the_filters():
    x = mx.array(np.random.default_rng(1).normal(size=(4, 300)).astype(np.float32))
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        y = x.astype(dtype)
        for sampler in (make_sampler(), make_sampler(0.0, 5, 0.5, 0.3)):
            assert np.array_equal(
                np.array(sampler(y, mx.random.key(0))), np.argmax(np.array(y.astype(mx.float32)), -1)
            )
    assert np.array_equal(
        np.array(make_sampler(1.0, top_k=1)(x, mx.random.key(0))), np.argmax(np.array(x), -1)
    )


def test_output_shape_dtype_and_half_precision_input():
    x = mx.random.normal((5, 1000), key=mx.random.key(1)).astype(mx.bfloat16)
    ids = make_sampler(1.0, 64, 0.95, 0.05)(x, mx.random.key(0))
    assert ids.shape == (5,) and ids.dtype in (mx.uint32, mx.int32)
    kept = ~np.isinf(np.array(filter_logits(x, 1.0, 64, 0.95, 0.05)))
    assert kept[np.arange(5), np.array(ids)].all()


def test_seeding():
    x = mx.array(np.random.default_rng(1).normal(size=(4, 100)).astype(np.float32))
    sample = make_sampler(1.0, 20, 0.95, 0.0)

    def run(seed: int) -> list[list[int]]:
        return [sample(x, k).tolist() for k in mx.random.split(mx.random.key(seed), 20)]

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert len({tuple(r) for r in run(3)}) > 1  # successive split keys give different tokens


def test_suppression():
    process = make_logits_processor([7, 3, 7])
    logits = mx.zeros((2, 10), dtype=mx.bfloat16)
    out = process(logits)
    assert out.dtype == mx.bfloat16 and out.shape == (2, 10)
    assert np.isinf(np.array(out[:, [3, 7]].astype(mx.float32))).all()
    assert not np.isinf(np.array(out[:, [0, 1, 2, 4, 5, 6, 8, 9]].astype(mx.float32))).any()
    assert not np.isinf(np.array(logits.astype(mx.float32))).any()  # the input is left untouched
    peak = mx.array([[0.0, 5.0, 1.0, 0.0]])  # the suppressed id would win greedy and sampling
    assert make_sampler()(make_logits_processor([1])(peak)).item() == 2
    assert (
        np.array(
            make_sampler(1.0)(mx.broadcast_to(make_logits_processor([1])(peak), (500, 4)), mx.random.key(0))
        )
        .tolist()
        .count(1)
        == 0
    )
    assert make_logits_processor([])(peak) is peak


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1}, r"temperature=-1: must be >= 0"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -2}, r"top_k=-2: must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, r"top_p=0.0: must be in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.0}, r"min_p=1.0: must be in \[0, 1\)"),
        ({"min_p": -0.1}, "min_p"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sampler(**kwargs)
    with pytest.raises(ValueError, match=match):
        filter_logits(mx.zeros((1, 4)), **{"temperature": 1.0, **kwargs})
