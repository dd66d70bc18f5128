"""Calibrated quantization (`convert --method awq|gptq`): the GPTQ packing is MLX's, AWQ's scale
folding is exact, each method's output loads and is exactly its own dequantized weights, and
calibration beats round to nearest on held-out prompts of a tiny model with activation outliers.

Tiny random models, float32, small calibration sets (4 prompts of 32 tokens) and a short AWQ grid
so the module stays fast on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import CORPUS, GEMMA3_CONFIG, UNIFIED_CONFIG, save_checkpoint

import gemma_mlx
from gemma_mlx.checkpoint import load_model, read_weights
from gemma_mlx.config import load_config
from gemma_mlx.convert import calibrate as calibrate_module
from gemma_mlx.convert import convert
from gemma_mlx.convert.calibrate import calibrate
from gemma_mlx.convert.calibration import CalibrationError, calibration_set
from gemma_mlx.convert.gptq import gptq_quantize, pack
from gemma_mlx.convert.quantize import QuantSpec, plan
from gemma_mlx.models.gemma import Model
from gemma_mlx.quality import compare, log_probs

CALIBRATION = dict(calibration_samples=4, calibration_length=32)
HELD_OUT = CORPUS[:2]
# max |folded - float| / max |float| logits: float32 roundoff through 6-8 layers whose channels are
# scaled up to ~100x by the outliers and the folds (measured 1.2e-4 on the unified model with an
# image prompt, 2e-6 on the real Gemma 3 270M's first three layers); a wrong fold is O(1)
FOLD_TOLERANCE = 3e-4  # the tiny tokenizer's own text, not in the stdlib calibration set


@pytest.fixture(autouse=True)
def short_grid(monkeypatch):
    monkeypatch.setattr(calibrate_module, "AWQ_GRID", 3)


def gemma3(tmp: Path) -> Path:
    return save_checkpoint(tmp / "gemma3", GEMMA3_CONFIG)


def outliers(path: Path) -> Path:
    """Give the checkpoint the activation outliers real models have, without changing its
    function: a few channels of every input/pre-feedforward norm scaled up 12x with the matching
    q/k/v and gate/up input columns scaled down, and a few up_proj rows 8x with the matching
    down_proj columns scaled down (gelu(gate) * up is linear in up)."""
    f = path / "model.safetensors"
    w = dict(mx.load(str(f)))
    cfg = load_config(path)
    offset = cfg.text.norm_offset
    rng = np.random.default_rng(1)
    for i in range(cfg.text.num_hidden_layers):
        p = f"language_model.layers.{i}."
        ch = mx.array(rng.choice(cfg.text.hidden_size, 4, replace=False))
        for norm, linears in (
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ):
            c = mx.ones(cfg.text.hidden_size).at[ch].multiply(12.0)
            w[p + norm + ".weight"] = (w[p + norm + ".weight"] + offset) * c - offset
            for name in linears:
                if p + name + ".weight" in w:
                    w[p + name + ".weight"] = w[p + name + ".weight"] / c
        rows = mx.array(rng.choice(cfg.text.intermediate_size, 8, replace=False))
        c = mx.ones(cfg.text.intermediate_size).at[rows].multiply(8.0)
        w[p + "mlp.up_proj.weight"] = w[p + "mlp.up_proj.weight"] * c[:, None]
        w[p + "mlp.down_proj.weight"] = w[p + "mlp.down_proj.weight"] / c
    mx.save_safetensors(str(f), w)
    return path


def dequantized_model(path: Path) -> Model:
    """A float model built from the dequantized weights a quantized checkpoint stores."""
    quantized = load_model(path)
    weights = {}
    for name, m in tree_flatten(quantized.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding):
            weights[f"{name}.weight"] = mx.dequantize(
                m.weight, m.scales, m.get("biases"), m.group_size, m.bits, mode=m.mode
            )
            for leaf, p in m.parameters().items():
                if leaf not in ("weight", "scales", "biases"):
                    weights[f"{name}.{leaf}"] = p
        else:
            weights.update({f"{name}.{k}": v for k, v in tree_flatten(m.parameters())})
    model = Model(load_config(path))
    model.load_weights(list(weights.items()), strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# GPTQ


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_layout(bits):
    w = mx.random.normal((8, 256), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, group_size=64, bits=bits)
    deq = np.array(mx.dequantize(packed, scales, biases, group_size=64, bits=bits))
    s, b = (np.repeat(np.array(a), 64, axis=1) for a in (scales, biases))
    codes = np.rint((deq - b) / s).astype(np.uint8)
    np.testing.assert_array_equal(pack(codes, bits), np.array(packed))


def test_gptq_without_correlation_is_rtn():
    """With H = I no error can be pushed anywhere: GPTQ must give MLX's own quantization."""
    w = mx.random.normal((16, 256), key=mx.random.key(0))
    ours = gptq_quantize(w, np.eye(256), QuantSpec(4, 64), mx.float32)
    ref = mx.quantize(w, group_size=64, bits=4)
    for a, b in zip((ours["weight"], ours["scales"], ours["biases"]), ref, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_gptq_lowers_output_error():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(128, 128)) * np.where(rng.random(128) < 0.05, 10, 1)  # correlated, outliers
    x = (rng.normal(size=(512, 128)) @ mix).astype(np.float32)
    w = mx.array(rng.normal(0, 0.05, (64, 128)).astype(np.float32))
    spec = QuantSpec(4, 64)

    def error(q):
        deq = mx.dequantize(q[0], q[1], q[2], group_size=64, bits=4)
        return float(np.linalg.norm(x @ (np.array(w) - np.array(deq)).T))

    gptq = gptq_quantize(w, x.T.astype(np.float64) @ x, spec, mx.float32)
    rtn = mx.quantize(w, group_size=64, bits=4)
    assert error((gptq["weight"], gptq["scales"], gptq["biases"])) < 0.8 * error(rtn)


# ---------------------------------------------------------------------------------------------
# AWQ folding


def _folded_logits(src: Path, inputs) -> tuple[np.ndarray, np.ndarray]:
    """(source logits, logits with AWQ's folded float weights) on `inputs`."""
    model, processor = gemma_mlx.load(src)
    cfg = model.config
    prompts = calibration_set(
        processor, "builtin", 4, 32, cfg.vision is not None, cfg.audio is not None, max_soft_tokens=70
    )
    layout = plan(model, QuantSpec(4, 32))
    ref = [np.array(model(mx.array([x.ids]), **x.model_kwargs())) for x in inputs(processor)]
    lazy = load_model(src, dtype=None, lazy=True)
    scratch = src.parent / "scratch"
    scratch.mkdir()
    replaced, packed, _ = calibrate(lazy, layout, "awq", prompts, scratch, lambda n: mx.float32)
    assert not packed and any(k.endswith("input_layernorm.weight") for k in replaced)
    assert any(k.endswith("mlp.up_proj.weight") for k in replaced)
    model.load_weights(list(replaced.items()), strict=False)
    out = [np.array(model(mx.array([x.ids]), **x.model_kwargs())) for x in inputs(processor)]
    return np.concatenate([r.ravel() for r in ref]), np.concatenate([o.ravel() for o in out])


def test_awq_fold_is_exact_gemma3(tmp_path):
    src = outliers(gemma3(tmp_path))
    ref, out = _folded_logits(src, lambda p: [p.prepare(HELD_OUT[0])])
    np.testing.assert_allclose(out, ref, atol=FOLD_TOLERANCE * np.abs(ref).max())


def test_awq_fold_is_exact_unified_with_media(tmp_path):
    """Gemma 4 norms (`x w`), k_eq_v layers and the weightless v_norm; calibrated and checked on
    image and audio prompts too."""
    from gemma_mlx.media import synthetic_audio, synthetic_image

    src = outliers(save_checkpoint(tmp_path / "unified", UNIFIED_CONFIG))

    def inputs(p):
        return [
            p.prepare(HELD_OUT[0]),
            p.prepare("Look:", images=[synthetic_image(7)], max_soft_tokens=70),
            p.prepare("Listen:", audio=[(synthetic_audio(7, 0.5), 16000.0)]),
        ]

    ref, out = _folded_logits(src, inputs)
    np.testing.assert_allclose(out, ref, atol=FOLD_TOLERANCE * np.abs(ref).max())


def test_awq_scales_spare_channels_the_calibration_leaves_silent(monkeypatch):
    """A channel (nearly) silent on the calibration text must not get a tiny scale: its weights
    would round away and held-out text that uses it would pay 1/s times their error. Measured:
    without the floor this layer's held-out error is 3x round to nearest's, with it 0.6x."""
    rng = np.random.default_rng(0)
    gain = np.ones(128)
    gain[:4] = 20.0  # outliers: AWQ's reason to scale at all
    calib = rng.normal(size=(1, 257, 128)) * gain
    calib[..., 8:40] *= 1e-3  # silent on the calibration text only
    held = mx.array((rng.normal(size=(1, 257, 128)) * gain).astype(np.float32))
    linear = nn.Linear(128, 64, bias=False)
    w = linear.weight = mx.array(rng.normal(size=(64, 128)).astype(np.float32))
    spec = QuantSpec.make(4, 32)

    class Layer:
        def fake(self, name, w):
            return calibrate_module.fake_quantize(w, spec, mx.float32)

    xs = [mx.array(calib.astype(np.float32))]
    floor = calibrate_module.AWQ_FLOOR

    def held_out_error(floor: float) -> float:
        monkeypatch.setattr(calibrate_module, "AWQ_FLOOR", floor)
        monkeypatch.setattr(calibrate_module, "AWQ_GRID", 20)
        s = calibrate_module._search_scales(Layer(), [("x", linear)], xs, lambda: [linear(x) for x in xs])
        return float(mx.sum(mx.square(held @ (Layer().fake("x", w * s) / s).T - held @ w.T)))

    rtn = float(mx.sum(mx.square(held @ Layer().fake("x", w).T - held @ w.T)))
    assert held_out_error(0.0) > 2 * rtn  # the failure the floor prevents
    assert held_out_error(floor) < 0.8 * rtn


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny Gemma 3 with outliers, converted at 4-bit g32 by each method (embedding kept in
    float, so the rows differ only by the decoder Linears the methods calibrate)."""
    tmp = tmp_path_factory.mktemp("calibrate")
    src = outliers(gemma3(tmp))
    mp = pytest.MonkeyPatch()
    mp.setattr(calibrate_module, "AWQ_GRID", 3)
    try:
        out = {
            m: convert(
                src,
                tmp / m,
                bits=4,
                group_size=32,
                method=m,
                quantize_embedding=False,
                progress=False,
                **CALIBRATION,
            )  # fmt: skip
            for m in ("rtn", "awq", "gptq")
        }
    finally:
        mp.undo()
    return src, out


def assert_is_its_dequantized_reference(out: Path) -> None:
    """The checkpoint at `out` loads and computes what its dequantized weights do (4-bit g32)."""
    model, processor = gemma_mlx.load(out)
    ids = mx.array([processor.encode_text(HELD_OUT[1])])
    ours = np.array(model(ids))
    ref = np.array(dequantized_model(out)(ids))
    np.testing.assert_allclose(ours, ref, atol=1e-5 * np.abs(ref).max())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_output_is_its_dequantized_reference(converted, method):
    src, reports = converted
    report = reports[method]
    assert_is_its_dequantized_reference(report.out)
    assert report.method == method and report.calibration.samples == 4
    assert f"| method | {method}, calibrated on 4 prompts" in (report.out / "README.md").read_text()


def test_gptq_stores_other_weights_than_rtn(converted):
    _, reports = converted
    a, b = (read_weights(reports[m].out) for m in ("rtn", "gptq"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert a[name].dtype == b[name].dtype == mx.uint32 and a[name].shape == b[name].shape
    assert (np.array(a[name]) != np.array(b[name])).mean() > 0.1


def test_calibrated_beats_rtn_on_held_out_text(converted):
    src, reports = converted
    ref_model, processor = gemma_mlx.load(src)
    kl = {}
    for method, report in reports.items():
        model = load_model(report.out)
        kl[method] = np.mean(
            [
                compare(log_probs(ref_model, ids), log_probs(model, ids), ids).mean_kl
                for ids in (processor.encode_text(t) for t in HELD_OUT)
            ]
        )
    assert kl["gptq"] < 0.8 * kl["rtn"], kl
    assert kl["awq"] < kl["rtn"], kl


# ---------------------------------------------------------------------------------------------
# Calibration sets and bad input


def test_builtin_set_is_deterministic_and_multimodal(tmp_path):
    src = save_checkpoint(tmp_path / "unified", UNIFIED_CONFIG)
    _, processor = gemma_mlx.load(src)
    a = calibration_set(processor, "builtin", 8, 32, vision=True, audio=True, max_soft_tokens=70)
    b = calibration_set(processor, "builtin", 8, 32, vision=True, audio=True, max_soft_tokens=70)
    assert [x.ids for x in a] == [x.ids for x in b]
    assert sum(x.pixel_values is not None for x in a) >= 1
    assert sum(x.input_features is not None for x in a) >= 1
    text = [x for x in a if not x.has_media]
    assert len(text) == 6 and all(len(x.ids) == 32 for x in text)
    assert len({tuple(x.ids) for x in text}) == 6


def test_txt_and_jsonl_files(tmp_path):
    src = save_checkpoint(tmp_path / "unified", UNIFIED_CONFIG)
    _, processor = gemma_mlx.load(src)
    (tmp_path / "c.txt").write_text(" ".join(CORPUS) * 20)
    windows = calibration_set(processor, tmp_path / "c.txt", 3, 16)
    assert len(windows) == 3 and all(len(w.ids) == 16 for w in windows)
    from PIL import Image

    from gemma_mlx.media import synthetic_image

    Image.fromarray(synthetic_image(0)).save(tmp_path / "i.png")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"text": "see", "image": "i.png"}) + "\n"
    )
    prompts = calibration_set(processor, tmp_path / "c.jsonl", 8, 16)
    assert len(prompts) == 2 and prompts[1].pixel_values is not None


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.jsonl", '{"text": "ok"}\n{"text": "x",}\n', r"a\.jsonl, line 2: not valid JSON"),
        ("b.jsonl", '{"text": "ok"}\n\n["text"]\n', r"b\.jsonl, line 3: expected an object"),
        ("c.jsonl", '{"text": "ok", "image": "nope.png"}\n', r"c\.jsonl, line 1: image file .*nope\.png"),
        ("d.jsonl", '{"text": "ok", "video": "v.mp4"}\n', r"d\.jsonl, line 1: unknown keys \['video'\]"),
        ("e.jsonl", "\n\n", r"e\.jsonl: no calibration prompts"),
        ("f.txt", "   \n", r"f\.txt: the file is empty"),
        ("g.csv", "a,b\n", r"g\.csv: expected a \.txt or \.jsonl"),
    ],
)
def test_bad_calibration_files(tmp_path, name, content, message):
    src = gemma3(tmp_path)
    _, processor = gemma_mlx.load(src)
    (tmp_path / name).write_text(content)
    with pytest.raises(CalibrationError, match=message):
        calibration_set(processor, tmp_path / name)


def test_bad_method_and_missing_file(tmp_path):
    src = gemma3(tmp_path)
    with pytest.raises(ValueError, match="--method 'sparse'"):
        convert(src, tmp_path / "o", method="sparse", progress=False)
    with pytest.raises(CalibrationError, match="missing.txt: no such file"):
        convert(src, tmp_path / "o", method="gptq", calibration=tmp_path / "missing.txt", progress=False)
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".calibration-*"))


def test_cli_method_flags(tmp_path):
    from typer.testing import CliRunner

    from gemma_mlx.cli.app import app

    src, runner = gemma3(tmp_path), CliRunner()
    bad = runner.invoke(app, ["convert", str(src), str(tmp_path / "x"), "--method", "sparse"])
    assert bad.exit_code != 0 and "--method 'sparse'" in bad.stderr
    args = ["--method", "gptq", "--calibration-samples", "2", "--calibration-length", "16"]
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "q"), *args])
    assert result.exit_code == 0, result.stderr
    assert "gptq, calibrated on 2 prompts" in result.stdout
    gemma_mlx.load(tmp_path / "q")
