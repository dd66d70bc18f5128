"""Mixed precision to a budget (convert/sensitivity.py, `convert --bits-per-weight`): the measured
sensitivity against a direct KL of really quantized models, the budget met as the converter
reports it, more bits where quantizing hurts, clear errors for impossible budgets, and output that
gemma_mlx (and a peer) loads. Tiny Gemma 3 text model, float32."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import GEMMA3_CONFIG, VOCAB, save_checkpoint
from typer.testing import CliRunner

import gemma_mlx
from gemma_mlx.checkpoint import load_model
from gemma_mlx.cli.app import app
from gemma_mlx.convert import QuantSpec, convert, layout_bytes, plan
from gemma_mlx.convert.sensitivity import (
    CANDIDATES,
    BudgetError,
    allocate,
    measure,
    units_of,
)
from gemma_mlx.quality import log_probs

RNG = np.random.default_rng(0)
WINDOWS = [[2, *RNG.integers(5, VOCAB, 23).tolist()] for _ in range(1)]  # past the window of 12
LOW = CANDIDATES[0]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("sens") / "src", GEMMA3_CONFIG)


@pytest.fixture(scope="module")
def measured(src):
    """(model, units, direct sensitivity: every candidate run through the model)."""
    model = load_model(src, dtype="float32")
    units = units_of([p for p, s in plan(model, LOW).items() if s is not None])
    return model, units, measure(model, WINDOWS, units)


def direct_kl(src: Path, paths: list[str], spec: QuantSpec) -> float:
    """Mean KL of the model with `paths` really quantized (QuantizedLinear/QuantizedEmbedding)."""
    ref = load_model(src, dtype="float32")
    var = load_model(src, dtype="float32")
    nn.quantize(var, spec.group_size, spec.bits, class_predicate=lambda p, m: p in paths)
    kls = []
    for w in WINDOWS:
        a, b = log_probs(ref, w), log_probs(var, w)
        kls.append((np.exp(a) * (a - b)).sum(-1))
    return float(np.concatenate(kls).mean())


def test_units_group_layers_by_attention_and_mlp(measured):
    _, units, _ = measured
    assert len(units) == 1 + 2 * GEMMA3_CONFIG["num_hidden_layers"]
    assert sorted(units["language_model.layers.2.self_attn"]) == [
        f"language_model.layers.2.self_attn.{p}_proj" for p in "koqv"
    ]
    assert sorted(units["language_model.layers.2.mlp"]) == [
        f"language_model.layers.2.mlp.{p}_proj" for p in ("down", "gate", "up")
    ]
    assert units["language_model.embed_tokens"] == ["language_model.embed_tokens"]


@pytest.mark.parametrize("unit", ["language_model.layers.3.mlp", "language_model.embed_tokens"])
@pytest.mark.parametrize("spec", [CANDIDATES[0], CANDIDATES[1], CANDIDATES[4]])
def test_measured_kl_equals_kl_of_really_quantized_model(src, measured, unit, spec):
    """Running from the cached layer input with fake-quantized weights is the same as the whole
    model with that unit quantized by `nn.quantize`."""
    _, units, sens = measured
    want = direct_kl(src, units[unit], spec)
    assert want > 1e-6
    assert sens.kl[unit][spec] == pytest.approx(want, rel=1e-3)


def test_estimate_tracks_measured_kl_in_the_quadratic_regime(measured):
    """The weight-error estimate for the costlier candidates (`direct=False`) within 2x of the
    measured KL where the cheapest candidate's KL is small; and the measurement itself: more
    bits, less KL."""
    model, units, direct = measured
    est = measure(model, WINDOWS, units, direct=False)
    assert est.measured == {(u, LOW) for u in units}
    small = [u for u in units if direct.kl[u][LOW] < 0.05]
    assert len(small) >= len(units) // 2
    for u in units:
        assert est.kl[u][LOW] == pytest.approx(direct.kl[u][LOW], rel=1e-6)
        assert (
            direct.kl[u][CANDIDATES[5]]
            < direct.kl[u][CANDIDATES[4]]
            < direct.kl[u][CANDIDATES[1]]
            < direct.kl[u][LOW]
        )
        for s in CANDIDATES[1:]:
            if u in small:
                assert 0.5 < est.kl[u][s] / direct.kl[u][s] < 2, (u, s, est.kl[u][s], direct.kl[u][s])


@pytest.mark.parametrize("budget", [4.3, 5.0, 5.5, 6.3, 7.7])
def test_budget_met_as_the_converter_reports_it(src, measured, tmp_path, budget):
    sens = measured[2]
    report = convert(src, tmp_path / "out", bits_per_weight=budget, sensitivity=sens, progress=False)
    assert budget - 0.05 <= report.bits_per_weight <= budget
    doc = json.loads((tmp_path / "out" / "quantization_plan.json").read_text())
    assert doc["bits_per_weight"] == pytest.approx(report.bits_per_weight, abs=1e-4)
    model, processor = gemma_mlx.load(tmp_path / "out")
    for unit, entry in doc["units"].items():
        module = model.language_model.embed_tokens if unit.endswith("embed_tokens") else None
        if module is None:
            i, kind = unit.split(".")[2:4]
            module = getattr(model.layers[int(i)], kind)
            module = module.q_proj if kind == "self_attn" else module.down_proj
        assert (module.bits, module.group_size) == (entry["spec"]["bits"], entry["spec"]["group_size"])
    text = gemma_mlx.generate(model, processor, "The quick brown fox", max_tokens=4).text
    assert isinstance(text, str)


def test_budget_in_bfloat16_counts_bfloat16_scales(src, measured, tmp_path):
    report = convert(
        src, tmp_path / "out", bits_per_weight=4.6, dtype="bfloat16", sensitivity=measured[2], progress=False
    )
    assert 4.55 <= report.bits_per_weight <= 4.6


def test_more_bits_where_quantizing_hurts(src, measured, tmp_path):
    """Layer 4's MLP made sensitive without changing the function: one hidden unit in each group
    of 64 of down_proj's inputs scaled up 1000x (its up_proj row down as much), so 4-bit rounds the
    other weights of every group to a few levels. The float output stays the same, that unit's
    KL rises, and at the same budget it never gets fewer bits than in the original model, and
    more at most budgets."""
    unit = "language_model.layers.4.mlp"
    hurt = save_checkpoint(tmp_path / "hurt", GEMMA3_CONFIG)
    weights = mx.load(str(hurt / "model.safetensors"))
    up, down = (f"{unit}.{p}_proj.weight" for p in ("up", "down"))
    u, d = np.array(weights[up]), np.array(weights[down])
    u[::64] /= 1000
    d[:, ::64] *= 1000
    weights[up], weights[down] = mx.array(u), mx.array(d)
    mx.save_safetensors(str(hurt / "model.safetensors"), weights)
    original, units, _ = measured
    model = load_model(hurt, dtype="float32")
    assert np.abs(log_probs(model, WINDOWS[0]) - log_probs(original, WINDOWS[0])).max() < 1e-3

    base = plan(model, LOW)
    before, after = (
        measure(original, WINDOWS, units, direct=False),
        measure(model, WINDOWS, units, direct=False),
    )
    assert after.kl[unit][LOW] > 10 * before.kl[unit][LOW]
    lowest = 8 * layout_bytes(model, base, 4) / sum(p.size for _, p in tree_flatten(model.parameters()))
    raised = []
    for extra in (0.3, 0.6, 1.0, 1.5, 2.0):
        was = allocate(original, base, before.kl, units, lowest + extra, 4).choice[unit]
        now = allocate(model, base, after.kl, units, lowest + extra, 4).choice[unit]
        assert now.bits_per_weight() >= was.bits_per_weight(), extra
        raised.append(now.bits_per_weight() > was.bits_per_weight())
    assert sum(raised) >= 2, raised


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (math.nan, "finite number"),
        (math.inf, "finite number"),
        (3.0, "below the cheapest layout"),
        (12.0, "above what the candidates reach"),
        (32.0, "at or above the float checkpoint"),
    ],
)
def test_bad_budgets_are_refused(src, measured, tmp_path, budget, message):
    with pytest.raises(BudgetError, match=message):
        convert(src, tmp_path / "out", bits_per_weight=budget, sensitivity=measured[2], progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(recipe="mixed_4_6"), "drop --recipe mixed_4_6"),
        (dict(overrides={"mlp": 8}), "drop --override"),
        (dict(quantize=False), "--no-quantize"),
        (dict(mode="mxfp4"), "drop --mode mxfp4"),
    ],
)
def test_budget_excludes_recipes_and_overrides(src, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert(src, tmp_path / "out", bits_per_weight=5.0, progress=False, **kwargs)


def test_cli_bits_per_weight(src, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(
        app, ["convert", str(src), str(tmp_path / "x"), "--bits-per-weight", "5", "--recipe", "mixed_4_6"]
    )
    assert bad.exit_code == 2 and "drop --recipe" in " ".join(bad.output.replace("│", " ").split())
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "out"
    ok = runner.invoke(
        app, ["convert", str(src), str(out), "--bits-per-weight", "5.5", "--calibration", str(calib)]
    )
    assert ok.exit_code == 0, ok.output
    assert "units at affine" in ok.output
    doc = json.loads((out / "quantization_plan.json").read_text())
    assert doc["calibration"] == str(calib) and 5.45 <= doc["bits_per_weight"] <= 5.5


@pytest.mark.slow
def test_mlx_lm_loads_budget_conversion(src, measured, tmp_path):
    pytest.importorskip("mlx_lm")
    from test_peers import MLX_LM_GEMMA3_SCALE, TOLERANCE, hf_checkpoint, logits, peer_model

    hf = hf_checkpoint(tmp_path / "hf", GEMMA3_CONFIG)
    out = tmp_path / "out"
    convert(hf, out, bits_per_weight=6.0, sensitivity=measured[2], progress=False)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert any(isinstance(v, dict) for v in quant.values())  # per-layer entries really present
    ours, _ = gemma_mlx.load(out)
    diff = np.abs(logits(ours, MLX_LM_GEMMA3_SCALE) - logits(peer_model("mlx_lm", out))).max()
    assert diff <= TOLERANCE, diff


def test_unified_model_budget(tmp_path):
    """The unified model: text units measured on a text file, the vision/audio projections
    (--quantize-multimodal) outside the units at 4-bit g64, the budget met."""
    src = save_checkpoint(tmp_path / "unified")
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "out"
    report = convert(
        src, out, bits_per_weight=5.0, calibration=calib, quantize_multimodal=True, progress=False
    )
    assert 4.95 <= report.bits_per_weight <= 5.0
    model, _ = gemma_mlx.load(out)
    proj = model.embed_vision.embedding_projection
    assert (proj.bits, proj.group_size) == (4, 64)
    units = json.loads((out / "quantization_plan.json").read_text())["units"]
    assert len(units) == 1 + 2 * len(model.layers)
