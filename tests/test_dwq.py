"""Distilled weight quantization (`convert --method dwq`, `gptq+dwq`): the output loads and is its
own dequantized reference, training moves only scales and biases (the integer codes are the
starting method's), the restricted-vocabulary KL is the full KL when the vocabulary is whole, and
DWQ beats round to nearest on held-out prompts of a tiny model with activation outliers.

Tiny random Gemma 3 (float32), 8 calibration prompts of 32 tokens, a few Adam steps.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_calibrate import HELD_OUT, assert_is_its_dequantized_reference, gemma3, outliers

import gemma_mlx
from gemma_mlx.checkpoint import load_model, read_weights
from gemma_mlx.convert import convert, dwq
from gemma_mlx.convert.calibration import calibration_set
from gemma_mlx.convert.dwq import DistillError, distill
from gemma_mlx.convert.quantize import QuantSpec, plan
from gemma_mlx.quality import compare, log_probs

CALIBRATION = dict(calibration_samples=8, calibration_length=32)
STEPS = 12


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny Gemma 3 with outliers at 4-bit g32 (embedding included) by RTN, DWQ, GPTQ and
    GPTQ+DWQ."""
    tmp = tmp_path_factory.mktemp("dwq")
    src = outliers(gemma3(tmp))
    out = {
        m: convert(
            src, tmp / m, bits=4, group_size=32, method=m, progress=False, dwq_steps=STEPS, **CALIBRATION
        )
        for m in ("rtn", "dwq", "gptq", "gptq+dwq")
    }
    return src, out


def _kl(src, out) -> float:
    ref, processor = gemma_mlx.load(src)
    model = load_model(out)
    return float(
        np.mean(
            [
                compare(log_probs(ref, ids), log_probs(model, ids), ids).mean_kl
                for ids in (processor.encode_text(t) for t in HELD_OUT)
            ]
        )
    )


@pytest.mark.parametrize("method", ["dwq", "gptq+dwq"])
def test_output_is_its_dequantized_reference(converted, method):
    src, reports = converted
    report = reports[method]
    assert_is_its_dequantized_reference(report.out)
    c = report.calibration
    assert report.method == method and c.samples == 8 and len(c.losses) == STEPS
    card = (report.out / "README.md").read_text()
    assert f"| method | {method}, calibrated on 8 prompts" in card and f"{STEPS} Adam steps" in card


@pytest.mark.parametrize("method, start", [("dwq", "rtn"), ("gptq+dwq", "gptq")])
def test_codes_frozen_scales_trained(converted, method, start):
    """Every packed weight is bit for bit the starting method's; scales and biases moved."""
    _, reports = converted
    a, b = read_weights(reports[start].out), read_weights(reports[method].out)
    assert a.keys() == b.keys()
    codes = [n for n in a if a[n].dtype == mx.uint32]
    assert "model.embed_tokens.weight" in codes and len(codes) == 1 + 7 * 6  # embedding + 6 layers' Linears
    for n in codes:
        np.testing.assert_array_equal(np.array(a[n]), np.array(b[n]), err_msg=n)
    moved = {n for n in a if n.endswith((".scales", ".biases")) and not mx.array_equal(a[n], b[n])}
    # the decoder's moved; the tied embedding / LM head keeps RTN by default (dwq.TRAIN_EMBEDDING)
    assert moved == {
        f"{n.removesuffix('.weight')}.{leaf}" for n in codes for leaf in ("scales", "biases")
    } - {
        "model.embed_tokens.scales",
        "model.embed_tokens.biases",
    }
    floats = [n for n in a if n.endswith("norm.weight")]
    assert floats and all(mx.array_equal(a[n], b[n]) for n in floats)  # norms frozen


def test_dwq_beats_rtn_and_gptq_on_held_out_text(converted):
    src, reports = converted
    kl = {m: _kl(src, r.out) for m, r in reports.items()}
    assert kl["dwq"] < 0.5 * kl["rtn"], kl
    assert kl["gptq+dwq"] < 0.5 * kl["gptq"], kl
    c = reports["dwq"].calibration
    # it trained: two batches alternate, so compare the last pass over both with the first
    assert np.mean(c.losses[-2:]) < 0.7 * np.mean(c.losses[:2]), c.losses


def test_restricted_vocabulary_is_exact_when_whole(tmp_path):
    """top_k = vocabulary: the restricted KL is the full KL (the same numbers, two code paths)."""
    src = gemma3(tmp_path)
    model = load_model(src, dtype=None, lazy=True)
    _, processor = gemma_mlx.load(src)
    prompts = calibration_set(processor, "builtin", 2, 16)
    layout = plan(model, QuantSpec(4, 32))
    vocab = model.config.text.vocab_size
    _, packed, report = distill(model, layout, prompts, lambda n: mx.float32, steps=1, top_k=vocab)
    assert report.vocab == [vocab] and packed == {p for p, s in layout.items() if s is not None}
    np.testing.assert_allclose(report.restricted_kl, report.full_kl, rtol=1e-4)
    assert report.full_kl[0] > 0.01


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=-1), r"--dwq-steps -1: expected an integer >= 0"),
        (dict(learning_rate=0.0), r"learning rate 0.0: expected a finite number > 0"),
        (dict(batch_size=0), r"batch size 0"),
        (dict(top_k=0), r"top_k 0"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    src = gemma3(tmp_path)
    model = load_model(src, dtype=None, lazy=True)
    layout = plan(model, QuantSpec(4, 32))
    with pytest.raises(DistillError, match=message):
        distill(model, layout, [], lambda n: mx.float32, **kwargs)


def test_bad_mode_and_media_only(tmp_path):
    src = gemma3(tmp_path)
    with pytest.raises(ValueError, match=r"--method dwq: affine quantization only \(got --mode mxfp4\)"):
        convert(src, tmp_path / "o", method="dwq", mode="mxfp4", progress=False)
    model = load_model(src, dtype=None, lazy=True)
    layout = plan(model, QuantSpec.make(4, None, "mxfp4"))
    with pytest.raises(DistillError, match="affine scales and biases; got --mode mxfp4"):
        distill(model, layout, [], lambda n: mx.float32)
    with pytest.raises(DistillError, match="needs text calibration prompts"):
        distill(model, plan(model, QuantSpec(4, 32)), [], lambda n: mx.float32)
    assert not (tmp_path / "o").exists()


def test_cli_dwq(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gemma_mlx.cli.app import app

    monkeypatch.setattr(dwq, "STEPS", 2)
    src, runner = gemma3(tmp_path), CliRunner()
    args = ["--method", "dwq", "--dwq-steps", "3", "--calibration-samples", "2", "--calibration-length", "16"]
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "q"), *args])
    assert result.exit_code == 0, result.stderr
    assert (
        "dwq, calibrated on 2 prompts" in result.stdout
        and "3 Adam steps" in (tmp_path / "q" / "README.md").read_text()
    )
    gemma_mlx.load(tmp_path / "q")
    bad = runner.invoke(
        app, ["convert", str(src), str(tmp_path / "x"), "--method", "dwq", "--dwq-steps", "-2"]
    )
    assert bad.exit_code != 0 and "--dwq-steps -2" in bad.stderr


def test_checkpointing_changes_nothing_but_memory(tmp_path):
    """Recomputing each layer in the backward pass gives the same training, step for step."""
    src = outliers(gemma3(tmp_path))
    _, processor = gemma_mlx.load(src)
    prompts = calibration_set(processor, "builtin", 2, 16)
    runs = []
    for checkpoint in (False, True):
        model = load_model(src, dtype=None, lazy=True)
        layout = plan(model, QuantSpec(4, 32))
        out, _, report = distill(model, layout, prompts, lambda n: mx.float32, steps=3, checkpoint=checkpoint)
        runs.append((report.losses, out["language_model.layers.2.mlp.down_proj.scales"]))
    (a, sa), (b, sb) = runs
    assert a[-1] < a[0]
    np.testing.assert_allclose(a, b, rtol=1e-4)
    np.testing.assert_allclose(np.array(sa), np.array(sb), rtol=1e-4, atol=1e-7)
