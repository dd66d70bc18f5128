"""The command line, run in-process with Typer's CliRunner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gemma_mlx import generate, load
from gemma_mlx.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint


def test_generate_greedy_prints_completion(model_dir):
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(model_dir),
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "The quick brown fox",
        ],
    )
    assert result.exit_code == 0, result.output
    model, processor = load(model_dir)
    expected = generate(model, processor, "The quick brown fox", max_tokens=12).text
    assert result.stdout.startswith(expected)
    assert "generated at" in result.stderr


def test_generate_reads_stdin_and_seeds(model_dir):
    args = ["generate", "--model", str(model_dir), "-n", "10", "--temperature", "1.0", "--seed", "7"]
    a = runner.invoke(app, args, input="Hello world")
    b = runner.invoke(app, [*args, "Hello world"])
    assert a.exit_code == b.exit_code == 0 and a.stdout == b.stdout


def test_user_errors_exit_nonzero_without_traceback(tmp_path):
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "missing"), "hi"])
    assert result.exit_code != 0 and "no such checkpoint directory" in result.stderr
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["generate", "--model", str(tmp_path), "--top-p", "2", "hi"])
    assert result.exit_code == 2  # Typer's own range check


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("gemma-mlx ")


def test_convert_info_bench(model_dir, tmp_path):
    out = tmp_path / "q4"
    result = runner.invoke(app, ["convert", str(model_dir), str(out), "--bits", "4", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert "bytes read per decoded token" in result.stdout and (out / "config.json").exists()
    again = runner.invoke(app, ["convert", str(model_dir), str(out)])
    assert again.exit_code != 0  # refuses to overwrite without --force
    info = runner.invoke(app, ["info", "--model", str(out), "--json", "--context", "4096"])
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["quantization"] == {"mode": "affine", "bits": 4, "group_size": 32}
    assert isinstance(data["fits"], bool) and data["context"] == 4096
    bench = runner.invoke(app, ["bench", "--model", str(out), "-p", "16", "-g", "4", "-r", "1", "--json"])
    assert bench.exit_code == 0, bench.output
    assert json.loads(bench.stdout)["generation_tps"] > 0
    gen = runner.invoke(app, ["generate", "--model", str(out), "-n", "4", "--json", "Hello"])
    assert json.loads(gen.stdout)["generation_tokens"] == 4


def test_bad_flag_combinations(model_dir, tmp_path):
    result = runner.invoke(app, ["convert", str(model_dir), str(tmp_path / "x"), "--bits", "7"])
    assert result.exit_code != 0
    result = runner.invoke(
        app, ["generate", "--model", str(model_dir), "--draft", str(tmp_path / "nope"), "hi"]
    )
    assert result.exit_code != 0 and "no such drafter" in result.stderr
