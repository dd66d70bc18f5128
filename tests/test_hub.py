"""Hub ids (`org/name[@revision]`) for `load`, `--model`, `--draft` and `convert SRC`, offline,
against a local cache laid out as huggingface_hub's (`models--org--name/snapshots/<commit>/`,
`refs/<branch or tag>`), with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointed at it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import mlx.core as mx
import numpy as np
import pytest
from tiny import save_checkpoint
from typer.testing import CliRunner

from gemma_mlx import CheckpointError, load
from gemma_mlx.cli.app import app
from gemma_mlx.convert import convert
from gemma_mlx.hub import parse_repo_id

MAIN, TAGGED = "a" * 40, "b" * 40  # commit hashes
IDS = mx.array([[2, 5, 17, 42, 99, 7]])


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """`org/tiny`: `main` at one commit, tag `v1` at another (other weights)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--org--tiny"
    for commit, ref, seed in ((MAIN, "main", 0), (TAGGED, "v1", 1)):
        save_checkpoint(repo / "snapshots" / commit, seed=seed)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch) -> Path:
    """Offline mode with the fixture cache, in this process (huggingface_hub reads its environment
    once, at import) and for subprocesses."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def snapshot(cache: Path, commit: str) -> Path:
    return cache / "models--org--tiny" / "snapshots" / commit


def logits(model) -> np.ndarray:
    return np.array(model(IDS))


def test_parse_repo_id():
    assert parse_repo_id("org/name") == ("org/name", None)
    assert parse_repo_id("mlx-community/gemma-4-12B-it-4bit@v1.0") == (
        "mlx-community/gemma-4-12B-it-4bit",
        "v1.0",
    )
    for bad in ("name", "a/b/c", "org/name@", "./org/name", "org name/x", "/abs/path"):
        assert parse_repo_id(bad) is None, bad


def test_load_by_hub_id_and_revision(offline):
    main, _ = load("org/tiny")
    assert np.array_equal(logits(main), logits(load(snapshot(offline, MAIN))[0]))
    tagged, processor = load("org/tiny@v1")
    assert processor is not None
    assert np.array_equal(logits(tagged), logits(load(snapshot(offline, TAGGED))[0]))
    assert not np.array_equal(logits(tagged), logits(main))
    by_commit, _ = load(f"org/tiny@{TAGGED}")
    assert np.array_equal(logits(by_commit), logits(tagged))


def test_missing_repo_or_revision_is_one_clear_line(offline):
    for source in ("org/missing", "org/tiny@nope"):
        with pytest.raises(CheckpointError) as e:
            load(source)
        message = str(e.value)
        assert message.startswith(f"{source}: not in the Hugging Face cache") and "\n" not in message
        assert "HF_HUB_OFFLINE" in message and "pass a local directory" in message
    with pytest.raises(CheckpointError, match="no such checkpoint directory .*Hub repo id"):
        load("a/b/c")


def test_convert_from_hub_id(offline, tmp_path):
    report = convert("org/tiny@v1", tmp_path / "q", progress=False)
    assert report.source == "org/tiny@v1"
    assert "base_model: org/tiny\n" in (tmp_path / "q" / "README.md").read_text()
    direct = convert(snapshot(offline, TAGGED), tmp_path / "d", progress=False)
    assert report.weight_bytes == direct.weight_bytes


def test_cli_model_and_draft_by_hub_id(offline):
    runner = CliRunner()
    result = runner.invoke(
        app, ["generate", "--model", "org/tiny", "--max-tokens", "3", "--temperature", "0", "hi"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["generate", "--model", "org/tiny", "--draft", "org/no-drafter", "hi"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--draft org/no-drafter: not in the Hugging Face cache" in result.stderr


def test_cli_honours_the_environment(offline):
    """A fresh process reads HF_HUB_OFFLINE / HF_HUB_CACHE from its environment."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(offline)}
    run = [sys.executable, "-m", "gemma_mlx.cli", "info", "--model"]
    ok = subprocess.run([*run, "org/tiny@v1"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "gemma4_unified" in ok.stdout, ok.stderr
    bad = subprocess.run([*run, "org/missing"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: --model org/missing: not in the Hugging Face cache")
