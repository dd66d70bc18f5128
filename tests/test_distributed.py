"""Pipeline-parallel generation: two ranks on 127.0.0.1 over MLX's ring backend give exactly the
single-process logits and tokens (text, an image prompt, the MTP drafter, chat cache reuse), each
rank holds only its stage, and a dead or hung rank ends the others with a clear error in bounded
time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import UNIFIED_CONFIG, randomized_weights, save_checkpoint

from gemma_mlx import ChatSession, generate, load, load_drafter
from gemma_mlx.config import parse_config, parse_drafter_config
from gemma_mlx.distributed import split_layers
from gemma_mlx.models.drafter import Drafter

pytestmark = pytest.mark.skipif(not mx.distributed.is_available("ring"), reason="no ring backend")

RANK_SCRIPT = Path(__file__).parent / "pipeline_rank.py"
SPLIT = [4, 4]  # rank 0: layers 4..7 (the last sliding and full layers), rank 1: layers 0..3
LIMIT = 90  # seconds any launch may take: a failing test never hangs


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch(tmp: Path, spec: dict, size: int = 2) -> list[subprocess.Popen]:
    """Start `size` ranks of tests/pipeline_rank.py with the environment `mlx.launch --backend
    ring` sets (MLX_HOSTFILE, MLX_RANK), on fresh loopback ports."""
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(size)]))
    (tmp / "spec.json").write_text(json.dumps({**spec, "out": str(tmp)}))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "PYTHONPATH": str(Path(__file__).parent)}
    procs = []
    for rank in range(size):
        procs.append(
            subprocess.Popen(
                [sys.executable, str(RANK_SCRIPT), str(tmp / "spec.json")],
                env={**env, "MLX_RANK": str(rank)},
                stdout=open(tmp / f"rank{rank}.out", "w"),
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def wait_all(procs: list[subprocess.Popen], limit: float = LIMIT) -> list[int]:
    deadline = time.monotonic() + limit
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes


def output(tmp: Path, rank: int) -> str:
    return (tmp / f"rank{rank}.out").read_text()


def save_drafter(path: Path) -> Path:
    """A tiny MTP drafter for the tiny unified target (its sliding and full geometry), random."""
    text = {
        **UNIFIED_CONFIG["text_config"],
        "num_hidden_layers": 2,
        "num_kv_shared_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "per_layer_config": {"1": {"head_dim": 64, "num_key_value_heads": 1}},
        "final_logit_softcapping": None,
    }
    raw = {"model_type": "gemma4_unified_assistant", "text_config": text, "backbone_hidden_size": 128}
    path.mkdir(parents=True)
    drafter = Drafter(parse_drafter_config(raw))
    mx.save_safetensors(str(path / "model.safetensors"), randomized_weights(drafter, 5))
    (path / "config.json").write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-rank launch doing all the parity work on rank 0 -> (checkpoint, drafter, reports)."""
    d = tmp_path_factory.mktemp("pipeline")
    ckpt = save_checkpoint(d / "ckpt")
    drafter = save_drafter(d / "drafter")
    image = (np.arange(64 * 48 * 3) % 251).reshape(64, 48, 3).astype(np.uint8)
    np.save(d / "image.npy", image)
    from PIL import Image

    Image.fromarray(image).save(d / "image.png")
    prompt = [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58]
    image_prompt = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(d / "image.png")},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    tasks = [
        {"kind": "logits", "ids": prompt},
        {
            "kind": "generate",
            "name": "text",
            "prompt": prompt,
            "kwargs": {"max_tokens": 24, "prefill_step_size": 7},
        },
        {"kind": "generate", "name": "image", "prompt": image_prompt, "kwargs": {"max_tokens": 12}},
        {
            "kind": "generate",
            "name": "drafter",
            "prompt": prompt,
            "kwargs": {"max_tokens": 24, "drafter": str(drafter), "draft_block_size": 4},
        },
        {"kind": "chat", "turns": ["Hello world", "The quick brown fox"], "max_tokens": 10},
    ]
    work = d / "run"
    work.mkdir()
    procs = launch(
        work, {"checkpoints": [str(ckpt)] * 2, "layers_per_rank": SPLIT, "tasks": tasks, "timeout": 60}
    )
    codes = wait_all(procs)
    assert codes == [0, 0], output(work, 0) + output(work, 1)
    reports = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    return ckpt, drafter, prompt, image_prompt, reports
