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

ring = pytest.mark.skipif(not mx.distributed.is_available("ring"), reason="no ring backend")
pytestmark = ring
multiprocess = pytest.mark.slow  # each launch starts two Python processes (about 5-30 s)

RANK_SCRIPT = Path(__file__).parent / "pipeline_rank.py"
SPLIT = [4, 4]  # rank 0: layers 4..7 (the last sliding and full layers), rank 1: layers 0..3
# the second request continues the first's conversation (its snapshot after the answer), the
# third shares only the system prompt and the start of the first message (a snapshot rolled back)
SERVER_REQUESTS = [
    {"messages": [{"role": "user", "content": "Hello world, the quick brown fox"}], "max_tokens": 6},
    {
        "messages": [
            {"role": "user", "content": "Hello world, the quick brown fox"},
            {"role": "assistant", "content": "ANSWER"},
            {"role": "user", "content": "jumps over the lazy dog"},
        ],
        "max_tokens": 6,
    },
    {"messages": [{"role": "user", "content": "Hello world, the lazy dog"}], "max_tokens": 6},
]
LIMIT = 90  # seconds any launch may take: a failing test never hangs


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch(
    tmp: Path, spec: dict | None, size: int = 2, command: list[str] | None = None
) -> list[subprocess.Popen]:
    """Start `size` ranks of tests/pipeline_rank.py (or of `command`) with the environment
    `mlx.launch --backend ring` sets (MLX_HOSTFILE, MLX_RANK), on fresh loopback ports (mlx.launch
    itself would take fixed ports from 32323)."""
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(size)]))
    if command is None:
        (tmp / "spec.json").write_text(json.dumps({**spec, "out": str(tmp)}))
        command = [sys.executable, str(RANK_SCRIPT), str(tmp / "spec.json")]
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "PYTHONPATH": str(Path(__file__).parent)}
    procs = []
    for rank in range(size):
        procs.append(
            subprocess.Popen(
                command,
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
        {
            "kind": "generate",
            "name": "kv8",
            "prompt": prompt,
            "kwargs": {"max_tokens": 16, "kv_bits": 8, "kv_group_size": 32},
        },
        {"kind": "chat", "turns": ["Hello world", "The quick brown fox"], "max_tokens": 10},
        {"kind": "server", "requests": SERVER_REQUESTS},
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


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")


@multiprocess
def test_logits_identical_to_one_process(run):
    ckpt, _, prompt, _, reports = run
    model, _ = load(ckpt)
    cache = model.make_cache()
    parts = [model(mx.array([prompt[:-3]]), cache)] + [model(mx.array([[t]]), cache) for t in prompt[-3:]]
    expected = np.array(mx.concatenate(parts, axis=1))
    assert np.array_equal(np.array(reports[0]["logits"], np.float32), expected)


@multiprocess
def test_greedy_text_identical_to_one_process(run):
    ckpt, _, prompt, _, reports = run
    model, processor = load(ckpt)
    expected = generate(model, processor, prompt, max_tokens=24, prefill_step_size=7).tokens
    assert reports[0]["text"]["tokens"] == expected and len(expected) == 24


@multiprocess
def test_image_prompt_identical_to_one_process(run):
    ckpt, _, _, image_prompt, reports = run
    model, processor = load(ckpt)
    assert processor.prepare(image_prompt).pixel_values is not None  # the prompt does hold an image
    expected = generate(model, processor, image_prompt, max_tokens=12).tokens
    assert reports[0]["image"]["tokens"] == expected


@multiprocess
def test_drafter_identical_to_one_process(run):
    ckpt, drafter_dir, prompt, _, reports = run
    model, processor = load(ckpt)
    drafter = load_drafter(drafter_dir)
    expected = generate(model, processor, prompt, max_tokens=24, drafter=drafter, draft_block_size=4)
    got = reports[0]["drafter"]
    assert got["tokens"] == expected.tokens
    assert got["drafted"] > 0  # the speculative path (drafts, verify, rollback) ran across ranks


@multiprocess
def test_quantized_kv_cache_identical_to_one_process(run):
    ckpt, _, prompt, _, reports = run
    model, processor = load(ckpt)
    expected = generate(model, processor, prompt, max_tokens=16, kv_bits=8, kv_group_size=32).tokens
    assert reports[0]["kv8"]["tokens"] == expected


@multiprocess
def test_chat_reuses_cache_across_turns(run):
    ckpt, _, _, _, reports = run
    model, processor = load(ckpt)
    chat = ChatSession(model, processor, max_tokens=10)
    expected = []
    for text in ["Hello world", "The quick brown fox"]:
        tokens = [c.token for c in chat.send(text)]
        expected.append({"tokens": tokens, "cached": chat.stats.cached_prompt_tokens})
    assert reports[0]["chat"] == expected
    assert expected[1]["cached"] > 0  # the second turn continued the cache


@multiprocess
def test_server_prompt_cache_identical_to_one_process(run):
    ckpt, _, _, _, reports = run
    model, processor = load(ckpt)
    from pipeline_rank import serve_requests

    got = reports[0]["server"]
    assert got == serve_requests(model, processor, SERVER_REQUESTS)
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in got]
    assert cached[1] > cached[2] > 0  # both reused snapshots kept on rank 1 and rank 0


@multiprocess
def test_each_rank_holds_only_its_stage(run):
    ckpt, _, _, _, reports = run
    model, _ = load(ckpt)
    full = dict(tree_flatten(model.parameters()))
    stages = split_layers(model.config, 2, SPLIT)
    assert [stages[0], stages[1]] == [range(4, 8), range(0, 4)]

    def layer(name: str) -> int | None:
        parts = name.split(".")
        return int(parts[2]) if parts[:2] == ["language_model", "layers"] else None

    rank1 = {
        n.replace(f"language_model.layers.{layer(n)}.", f"layers.{layer(n)}.")
        for n in full
        if layer(n) in stages[1]
    }
    rank0 = {
        n if layer(n) is None else n.replace(f".layers.{layer(n)}.", f".layers.{layer(n) - 4}.")
        for n in full
        if layer(n) is None or layer(n) in stages[0]
    }
    assert set(reports[1]["names"]) == rank1
    assert set(reports[0]["names"]) == rank0
    count = {n: v.size for n, v in full.items()}
    assert reports[0]["params"] + reports[1]["params"] == sum(count.values())
    assert reports[1]["params"] == sum(count[n] for n in full if layer(n) in stages[1])


def start_forever(tmp: Path, ckpt: Path, timeout: float | None = 60) -> list[subprocess.Popen]:
    """Two ranks, rank 0 decoding without end; returns once it decodes."""
    procs = launch(tmp, {"checkpoints": [str(ckpt)] * 2, "tasks": [{"kind": "forever"}], "timeout": timeout})
    deadline = time.monotonic() + LIMIT
    while not (tmp / "decoding").exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            wait_all(procs, 1)
            pytest.fail("the ranks did not start decoding: " + output(tmp, 0) + output(tmp, 1))
        time.sleep(0.1)
    return procs


@multiprocess
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_rank_stops_the_other_with_an_error(ckpt, tmp_path, victim):
    procs = start_forever(tmp_path, ckpt)
    procs[victim].kill()
    tic = time.monotonic()
    survivor = 1 - victim
    code = wait_all([procs[survivor]], limit=20)[0]
    wait_all(procs, 1)
    assert time.monotonic() - tic < 20
    assert code != 0
    text = output(tmp_path, survivor)
    assert "PipelineError" in text and f"rank {survivor}" in text and "exited or crashed" in text, text


@multiprocess
def test_hung_rank_ends_the_pipeline_after_the_timeout(ckpt, tmp_path):
    procs = start_forever(tmp_path, ckpt, timeout=5)  # longer than any step on a loaded machine
    os.kill(procs[1].pid, signal.SIGSTOP)  # alive, sockets open, never answering
    try:
        tic = time.monotonic()
        code = wait_all([procs[0]], limit=20)[0]
        assert time.monotonic() - tic < 15
    finally:
        procs[1].kill()
        wait_all(procs, 5)
    assert code == 3
    assert "rank 0: waiting for rank 1 (no answer in 5 s)" in output(tmp_path, 0)


@multiprocess
def test_ranks_with_different_checkpoints_refuse(ckpt, tmp_path):
    other = save_checkpoint(tmp_path / "other", seed=1)  # same config and shapes, other weights
    work = tmp_path / "run"
    work.mkdir()
    procs = launch(work, {"checkpoints": [str(ckpt), str(other)], "tasks": []})
    codes = wait_all(procs)
    assert codes[0] != 0 and codes[1] != 0
    for rank in range(2):
        assert "CheckpointError" in output(work, rank) and "ranks [1] do not load the checkpoint" in output(
            work, rank
        )


def test_split_layers_by_count_bytes_and_refusals():
    config = parse_config(UNIFIED_CONFIG)  # 8 layers; last sliding 6, last full 7
    assert split_layers(config, 2) == [range(4, 8), range(0, 4)]
    assert split_layers(config, 3, [2, 3, 3]) == [range(6, 8), range(0, 3), range(3, 6)]
    # rank 0 also holds the embeddings: by bytes it takes fewer layers
    assert split_layers(config, 2, sizes=([10] * 8, 40)) == [range(6, 8), range(0, 6)]
    with pytest.raises(ValueError, match="rank 0 holds the last 1 layers; it needs at least 2 "):
        split_layers(config, 2, [1, 7])
    with pytest.raises(ValueError, match="adding up to the 8 layers"):
        split_layers(config, 2, [4, 3])
    with pytest.raises(ValueError, match="at least 2 ranks"):
        split_layers(config, 1)


@multiprocess
def test_cli_generate_distributed_prints_the_one_process_text(ckpt, tmp_path):
    args = ["generate", "The quick brown", "-m", str(ckpt), "-n", "12", "--json"]
    cli = [sys.executable, "-m", "gemma_mlx.cli"]
    procs = launch(tmp_path, None, command=[*cli, *args, "--distributed", "--layers-per-rank", "5,3"])
    assert wait_all(procs) == [0, 0], output(tmp_path, 0) + output(tmp_path, 1)
    single = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=LIMIT, check=True)
    ours = json.loads(output(tmp_path, 0).strip().splitlines()[-1])
    assert ours["text"] == json.loads(single.stdout)["text"] and ours["generation_tokens"] == 12
    assert output(tmp_path, 1) == ""  # the follower prints nothing


def test_cli_distributed_without_a_group_is_a_clear_error(ckpt):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    r = subprocess.run(
        [sys.executable, "-m", "gemma_mlx.cli", "generate", "hi", "-m", str(ckpt), "--distributed"],
        capture_output=True,
        text=True,
        timeout=LIMIT,
        env=env,
    )
    assert r.returncode == 1
    assert (
        "--distributed: no distributed group could be formed" in r.stderr and "mlx.launch --hosts" in r.stderr
    )


def test_a_peer_that_never_comes_ends_the_wait(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": "0"}
    code = "from gemma_mlx.distributed import init_group; init_group(timeout=2)"
    tic = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=LIMIT)
    assert r.returncode != 0 and time.monotonic() - tic < 30
    assert "rank 0: the group could not be formed" in r.stderr and "(no answer in 2 s)" in r.stderr


@pytest.fixture(scope="module")
def prefill_run(tmp_path_factory):
    """One 2-rank launch: chunked prefills (text, then an image prompt) with the hidden-state
    transfers timed on both ranks, and a greedy image generation after a chunked prefill."""
    d = tmp_path_factory.mktemp("prefill")
    ckpt = save_checkpoint(d / "ckpt")
    image = (np.arange(64 * 48 * 3) % 251).reshape(64, 48, 3).astype(np.uint8)
    from PIL import Image

    Image.fromarray(image).save(d / "image.png")
    text = [2, *range(40, 100)]
    image_prompt = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image", "image": str(d / "image.png")},
                {"type": "text", "text": "What is it? The quick brown fox jumps over the lazy dog."},
            ],
        }
    ]
    tasks = [
        {"kind": "prefill", "name": "text", "prompt": text, "step": 6},
        {"kind": "prefill", "name": "image", "prompt": image_prompt, "step": 5},
        {"kind": "prefill_fails", "prompt": text, "step": 6},
        {
            "kind": "generate",
            "name": "generate",
            "prompt": image_prompt,
            "kwargs": {"max_tokens": 12, "prefill_step_size": 5},
        },
    ]
    work = d / "run"
    work.mkdir()
    spec = {"checkpoints": [str(ckpt)] * 2, "layers_per_rank": SPLIT, "tasks": tasks, "timeout": 60}
    codes = wait_all(launch(work, {**spec, "timeline": True}))
    assert codes == [0, 0], output(work, 0) + output(work, 1)
    reports = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    return ckpt, {"text": text, "image": image_prompt}, reports


def one_process_prefill(model, processor, prompt, step: int) -> dict:
    """What tests/pipeline_rank.py's "prefill" task reports, in one process (no pipeline)."""
    from pipeline_rank import digest

    from gemma_mlx.generate import prefill

    inputs = processor.prepare(prompt)
    ids, cache, ends = mx.array(inputs.ids), model.make_cache(), []
    prefill(
        model,
        ids[:-3],
        cache,
        media=inputs.model_kwargs() or None,
        step=step,
        progress=lambda d, n: ends.append(d),
    )
    local = [digest(cache[i].state) for i in range(SPLIT[1], sum(SPLIT))]
    logits = mx.concatenate(
        [model(ids[None, i : i + 1], cache) for i in range(ids.size - 3, ids.size)], axis=1
    )
    return {"ends": ends, "local_cache": local, "logits": np.array(logits)}


@multiprocess
@pytest.mark.parametrize(("name", "step"), [("text", 6), ("image", 5)])
def test_overlapped_prefill_identical_to_one_process(prefill_run, name, step):
    ckpt, prompts, reports = prefill_run
    model, processor = load(ckpt)
    expected = one_process_prefill(model, processor, prompts[name], step)
    got = reports[0][name]
    assert [e for e, _ in got["ends"]] == expected["ends"] and len(expected["ends"]) >= 5
    assert got["local_cache"] == expected["local_cache"]  # rank 0's layers 4..7
    # the next logits read every layer's cache, rank 1's included
    assert np.array_equal(np.array(got["logits"], np.float32), expected["logits"])
    if name == "image":
        assert processor.prepare(prompts[name]).pixel_values is not None


@multiprocess
def test_greedy_after_overlapped_image_prefill(prefill_run):
    """Also after a prefill whose progress callback raised with a chunk in flight."""
    ckpt, prompts, reports = prefill_run
    assert reports[0]["prefill_failed"]
    model, processor = load(ckpt)
    expected = generate(model, processor, prompts["image"], max_tokens=12, prefill_step_size=5).tokens
    assert reports[0]["generate"]["tokens"] == expected and len(expected) == 12


@multiprocess
def test_followers_start_next_chunk_before_rank0_finishes(prefill_run):
    """Rank 1 receives chunk k+1 (and starts its layers) before rank 0 has finished its own layers
    on chunk k: without the overlap it would get chunk k+1 only afterwards (checked: the test
    fails when prefill takes the sequential path)."""
    _, _, reports = prefill_run
    ends = [t for _, t in reports[0]["text"]["ends"]]
    starts = [e[1] for e in reports[1]["timeline"] if e[0] == "recv"][
        : len(ends)
    ]  # the text prefill came first
    assert len(ends) >= 5
    early = [starts[k + 1] < ends[k] for k in range(len(ends) - 1)]
    # sequential chunks: never (rank 1 gets chunk k+1 only after rank 0's done(k)); overlapped:
    # always by construction, unless rank 1 is descheduled longer than rank 0's tiny stage runs
    assert sum(early) >= len(early) / 2, (starts, ends)
