"""`gemma-mlx bench`: every reported field is there and positive (a smoke test on the tiny
checkpoint: no timing thresholds)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from tiny import Oracle
from typer.testing import CliRunner

from gemma_mlx import load
from gemma_mlx.benchmark import bench_report, copy_bandwidth
from gemma_mlx.cli.app import app


def positive(d: dict, *keys: str) -> None:
    for k in keys:
        assert d[k] > 0, k


def test_bench_json(checkpoint):
    args = ["bench", "--model", str(checkpoint), "-p", "4,9", "-g", "3", "-r", "1", "-d", "0,20", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["prompt_tokens"] for r in report["prefill"]] == [4, 9]
    for row in report["prefill"]:
        positive(row, "prefill_tps", "ttft_s")
    assert [r["depth"] for r in report["decode"]] == [0, 20]
    for row in report["decode"]:
        positive(row, "decode_tps", "bytes_per_token", "gb_per_s", "bandwidth_fraction")
    deeper, shallow = report["decode"][1]["bytes_per_token"], report["decode"][0]["bytes_per_token"]
    assert deeper > shallow  # the KV cache read at depth 20 counts
    positive(report, "ttft_s", "prompt_tps", "generation_tps", "copy_bandwidth_gb_per_s", "peak_memory_gb")
    positive(report, "bandwidth_fraction", "weights_gb_per_s")
    # the tiny checkpoint is a unified model: one image at the default budget, 3 s of audio
    image, audio = report["media"]
    assert (image["input"], audio["input"]) == ("image", "audio 3 s")
    assert 0 < image["media_tokens"] <= 280  # within the default soft-token budget
    assert audio["media_tokens"] == 75  # 3 s at 640 samples (40 ms) per token
    for row in report["media"]:
        assert row["prompt_tokens"] > row["media_tokens"]
        positive(row, "preprocess_s", "ttft_s", "prefill_tps")
    table = CliRunner().invoke(app, args[:-1])
    assert table.exit_code == 0 and "decode @ 20" in table.stdout and "copy bandwidth" in table.stdout
    assert "prefill image" in table.stdout and "prefill audio 3 s" in table.stdout


def test_bench_text_model_has_no_media_rows(tmp_path):
    from tiny import GEMMA3_CONFIG, save_checkpoint

    model, processor = load(save_checkpoint(tmp_path / "g3", GEMMA3_CONFIG))
    report = bench_report(
        model, 1000, prompt_lengths=[3], depths=[0], generation_tokens=2, trials=1, processor=processor
    )
    assert "media" not in report


def test_bench_plot(checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "decode.png"
    args = [
        "bench",
        "--model",
        str(checkpoint),
        "-p",
        "4",
        "-g",
        "3",
        "-r",
        "1",
        "-d",
        "0,8,16",
        "--plot",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_bench_plot_without_matplotlib_names_the_extra(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    args = ["bench", "--model", str(checkpoint), "--plot", str(tmp_path / "x.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "gemma-mlx[plot]" in result.output
    assert not (tmp_path / "x.png").exists()


def test_bench_rejects_bad_lists(checkpoint):
    result = CliRunner().invoke(app, ["bench", "--model", str(checkpoint), "-d", "0,x"])
    assert result.exit_code != 0 and "--depths '0,x'" in result.output


def test_bench_with_a_drafter_reports_acceptance_and_speedup(checkpoint):
    model, _ = load(checkpoint)
    plain = bench_report(model, 1000, prompt_lengths=[3], depths=[0], generation_tokens=3, trials=1)
    assert "draft" not in plain
    drafter = Oracle([], model.config.text.vocab_size)  # knows nothing: drafts token 0
    report = bench_report(
        model,
        1000,
        prompt_lengths=[3],
        depths=[0],
        generation_tokens=12,
        trials=1,
        drafter=drafter,
        draft_block_size=3,
        bandwidth_bytes=2**20,
    )
    d = report["draft"]
    positive(d, "decode_tps", "plain_decode_tps", "speedup", "tokens_per_round", "drafted")
    assert d["tokens_per_round"] >= 1 and 0 <= d["acceptance"] <= 1 and d["max_block_size"] == 3
    assert np.isclose(d["speedup"], d["decode_tps"] / d["plain_decode_tps"])


def test_copy_bandwidth_is_positive():
    assert copy_bandwidth(2**20, trials=1) > 0


def test_quantized_checkpoints_compute_in_float32_on_the_cpu(checkpoint, tmp_path):
    """Backend-aware default dtype: float32 activations for quantized weights on the CPU backend
    (16-bit ones are several times slower there); None keeps the stored bfloat16."""
    import mlx.core as mx

    from gemma_mlx.checkpoint import compute_dtype
    from gemma_mlx.convert import convert

    out = tmp_path / "q8"
    convert(checkpoint, out, bits=8, group_size=32, dtype="bfloat16", progress=False)
    norm = lambda m: m.language_model.layers[0].input_layernorm.weight.dtype  # noqa: E731
    scales = lambda m: m.language_model.layers[0].mlp.down_proj.scales.dtype  # noqa: E731
    stored, _ = load(out, dtype=None)
    assert norm(stored) == scales(stored) == mx.bfloat16
    assert compute_dtype(None) is None  # unquantized: as stored on every backend
    if mx.default_device() == mx.cpu:
        assert compute_dtype({"bits": 8}) == mx.float32
        auto, _ = load(out)
        assert norm(auto) == scales(auto) == mx.float32
        assert auto(mx.array([[5, 6, 7]])).dtype == mx.float32
    forced, _ = load(out, dtype="bfloat16")
    assert scales(forced) == mx.bfloat16
