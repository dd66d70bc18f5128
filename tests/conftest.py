"""Session fixtures: tiny reference models saved once per test run."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from reference import build  # noqa: E402


@pytest.fixture(scope="session")
def unified(tmp_path_factory):
    """(checkpoint dir, reference model) of a tiny `Gemma4UnifiedForConditionalGeneration`."""
    path = tmp_path_factory.mktemp("unified")
    return path, build("unified", path)


@pytest.fixture(scope="session")
def causal(tmp_path_factory):
    """(checkpoint dir, reference model) of a tiny text-only `Gemma4UnifiedForCausalLM`."""
    path = tmp_path_factory.mktemp("causal")
    return path, build("causal", path, seed=1)
