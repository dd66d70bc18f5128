"""Session fixtures: tiny checkpoints saved once per test run.

`checkpoint` needs only MLX (random weights, real schema); `unified` and `causal` are built by
transformers and come with the reference model, so tests that use them skip without torch.
"""

from __future__ import annotations

import pytest
from tiny import save_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A runnable tiny unified (text + vision + audio) checkpoint with a tokenizer (no torch)."""
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def unified(tmp_path_factory):
    """(checkpoint dir, reference model) of a tiny `Gemma4UnifiedForConditionalGeneration`."""
    from reference import build

    path = tmp_path_factory.mktemp("unified")
    return path, build("unified", path)


@pytest.fixture(scope="session")
def causal(tmp_path_factory):
    """(checkpoint dir, reference model) of a tiny text-only `Gemma4UnifiedForCausalLM`."""
    from reference import build

    path = tmp_path_factory.mktemp("causal")
    return path, build("causal", path, seed=1)
