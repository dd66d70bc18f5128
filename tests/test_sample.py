"""Sampler parity with transformers' logits warpers, seeding, suppression, argument checks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gemma_mlx.sample import make_logits_processor, make_sampler, min_p_filter, top_k_filter, top_p_filter


def ours_filtered(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float
) -> np.ndarray:
    x = mx.array(logits) / temperature
    if top_k:
        x = top_k_filter(x, top_k)
    if top_p < 1:
        x = top_p_filter(x, top_p)
    if min_p:
        x = min_p_filter(x, min_p)
    return np.array(x)


def hf_filtered(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    procs = LogitsProcessorList([TemperatureLogitsWarper(temperature)])  # the order of `generate`
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(TopPLogitsWarper(top_p))
    if min_p:
        procs.append(MinPLogitsWarper(min_p))
    return procs(None, torch.tensor(logits)).numpy()


def logits_cases():
    rng = np.random.default_rng(0)
    yield rng.normal(size=(3, 1000)).astype(np.float32) * 3
    peaked = rng.normal(size=(2, 500)).astype(np.float32)
    peaked[:, 7] += 15
    yield peaked


@pytest.mark.parametrize(
    "params",
    [
        (1.0, 50, 1.0, 0.0),
        (0.7, 0, 0.9, 0.0),
        (1.3, 0, 1.0, 0.1),
        (1.0, 40, 0.8, 0.05),
        (0.5, 5, 0.5, 0.2),
        (1.0, 0, 0.3, 0.0),
    ],
)
def test_filters_match_transformers(params):
    for logits in logits_cases():
        ours, ref = ours_filtered(logits, *params), hf_filtered(logits, *params)
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
        p_ours = np.array(mx.softmax(mx.array(ours), axis=-1))
        p_ref = torch.softmax(torch.tensor(ref), -1).numpy()
        np.testing.assert_allclose(p_ours, p_ref, atol=1e-5)


def test_ties_at_the_boundary_are_kept():
    """With ties, which tied token a sort puts first is arbitrary (torch and MLX differ); we keep the
    whole tied group at the boundary, a superset of transformers' choice that differs only there."""
    logits = np.round(np.random.default_rng(5).normal(size=(2, 300)), 1).astype(np.float32)
    for params in [(1.0, 40, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.0, 30, 0.7, 0.1)]:
        ours, ref = ours_filtered(logits, *params), hf_filtered(logits, *params)
        extra = ~np.isinf(ours) & np.isinf(ref)
        assert not (np.isinf(ours) & ~np.isinf(ref)).any()
        for row in range(2):
            kept = ours[row][~np.isinf(ours[row])]
            assert np.all(ours[row][extra[row]] == kept.min())


def test_greedy_and_seeding():
    logits = mx.array(np.random.default_rng(1).normal(size=(4, 100)).astype(np.float32))
    assert np.array_equal(np.array(make_sampler()(logits)), np.argmax(np.array(logits), -1))
    sample = make_sampler(1.0, 20, 0.95, 0.0)
    a = [sample(logits, k).tolist() for k in mx.random.split(mx.random.key(3), 20)]
    b = [sample(logits, k).tolist() for k in mx.random.split(mx.random.key(3), 20)]
    c = [sample(logits, k).tolist() for k in mx.random.split(mx.random.key(4), 20)]
    assert a == b and a != c


def test_sampling_frequencies_follow_filtered_distribution():
    """Draw many samples: frequencies match the filtered probabilities and no filtered-out token
    ever appears (this fails if, e.g., top-k were ignored or applied after top-p)."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 64)).astype(np.float32) * 2
    params = (1.0, 10, 0.9, 0.0)
    probs = torch.softmax(torch.tensor(hf_filtered(logits, *params)), -1).numpy()[0]
    sample = make_sampler(*params)
    keys = mx.random.split(mx.random.key(0), 4000)
    draws = np.array(mx.stack([sample(mx.array(logits), k) for k in keys])).reshape(-1)
    freq = np.bincount(draws, minlength=64) / len(draws)
    assert set(np.nonzero(freq)[0]) <= set(np.nonzero(probs)[0])
    assert np.abs(freq - probs).max() < 0.035  # ~4.5 standard errors at 4000 draws


def test_suppression():
    logits = mx.zeros((2, 10))
    out = np.array(make_logits_processor([3, 7])(logits))
    assert np.isinf(out[:, [3, 7]]).all() and not np.isinf(out[:, [0, 1, 2, 4]]).any()
    assert not np.isinf(np.array(logits)).any()  # the input is left untouched


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.0}, "min_p"),
    ],
)
def test_argument_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_sampler(**kwargs)
