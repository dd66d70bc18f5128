"""Continuous batching: rows decoded together equal the same requests decoded alone.

A batch holds rows at their own positions (per-row offsets in merged caches), so every row's
logits must match its solo run to float32 rounding and its tokens exactly, whatever joins or
leaves around it: float and 8-bit KV caches, sliding-window rings that wrap (slack 2), prompts
prefilled a chunk per step while others decode, media, tools, a JSON schema and seeded sampling.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_server import MODEL, Server, loaded, model_dir, reference, wait_idle  # noqa: F401 (fixtures)
from tiny import rel_err, save_checkpoint

from gemma_mlx import batch_generate, generate, load
from gemma_mlx.footprint import default_concurrency, kv_cache_bytes
from gemma_mlx.generate import Batch, make_cache, prepare_request
from gemma_mlx.media import SAMPLE_RATE, synthetic_audio, synthetic_image
from gemma_mlx.tools import parse_output

httpx = pytest.importorskip("httpx")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "point",
        "schema": {
            "type": "object",
            "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
            "required": ["x", "y"],
        },
    },
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny unified model with its end-of-sequence id (the server tests' `loaded` has none)."""
    return load(save_checkpoint(tmp_path_factory.mktemp("batch") / "ckpt"))


def requests() -> list[tuple[int, object, dict]]:
    """(the step it arrives at, prompt, prepare_request's arguments): 9 different requests."""
    long = "The quick brown fox jumps over the lazy dog and keeps running far away. " * 4
    return [
        (0, "Hello", {"max_tokens": 24}),
        (0, long, {"max_tokens": 6}),  # prefilled in several chunks, leaves early
        (0, [{"role": "user", "content": "Tell me a story about a cat."}], {"max_tokens": 30}),
        (2, "<|image|>What is in the picture?", {"images": [synthetic_image(1, 96)], "max_tokens": 12}),
        (
            3,
            "<|audio|>Transcribe this.",
            {"audio": [(synthetic_audio(2, 0.5), SAMPLE_RATE)], "max_tokens": 10},
        ),
        (5, [{"role": "user", "content": "Weather in Paris?"}], {"tools": TOOLS, "max_tokens": 20}),
        (5, "Count: one two three", {"temperature": 1.0, "top_k": 40, "seed": 7, "max_tokens": 16}),
        (8, long[:90], {"max_tokens": 8}),  # joins while others decode
        (9, "A JSON point:", {"response_format": SCHEMA, "max_tokens": 20}),
    ]


def run(model, processor, specs, kv_bits, alone: bool) -> list[tuple[list[int], list[np.ndarray]]]:
    """Decode `specs` in one Batch (arrivals at their steps) or each in a Batch of its own ->
    per request (tokens, the logits each token was drawn from)."""

    def start(prompt, kwargs):
        cache = make_cache(model, slack=2, kv_bits=kv_bits, kv_group_size=32)  # rings wrap early
        request = prepare_request(model, processor, prompt, cache=cache, **kwargs)
        inner, seen = request.row.sample, []

        def sample(logits, *args, **kw):  # records what each token was drawn from
            seen.append(logits)
            return inner(logits, *args, **kw)

        request.row.sample = sample
        return request, seen

    def drive(batch, pending):
        out = {}
        step = 0
        while pending or len(batch):
            most[0] = max(most[0], len(batch.rows))
            for arrive, i, prompt, kwargs in [p for p in pending if p[0] <= step]:
                pending.remove((arrive, i, prompt, kwargs))
                request, seen = start(prompt, kwargs)
                batch.add(request.row)
                out[request.row] = (i, request, [], seen)
            for row, tokens in batch.step():
                assert row.error is None, row.error
                _, request, got, _ = out[row]
                for token in tokens:
                    got.append(token)
                    if request.output.add(token).finish_reason:
                        batch.remove(row)
                        break
            step += 1
        results = [None] * len(specs)
        for i, _, got, seen in out.values():
            results[i] = (got, [np.array(x) for x in seen[: len(got)]])
        return results

    specs = [(arrive, i, prompt, kwargs) for i, (arrive, prompt, kwargs) in enumerate(specs)]
    most = [0]  # the most rows that decoded together
    if not alone:
        results = drive(Batch(model, prefill_step_size=8), list(specs))
        assert most[0] >= 4  # rows really decoded together
        return results
    results = []
    for _, _, prompt, kwargs in specs:
        results.append(drive(Batch(model, prefill_step_size=8), [(0, 0, prompt, kwargs)])[0])
    return results


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_rows_in_a_batch_equal_their_solo_runs(tiny_model, kv_bits):
    model, processor = tiny_model
    specs = requests()
    together = run(model, processor, specs, kv_bits, alone=False)
    alone = run(model, processor, specs, kv_bits, alone=True)
    for (tokens, logits), (ref_tokens, ref_logits), (_, prompt, _) in zip(
        together, alone, specs, strict=True
    ):
        assert tokens == ref_tokens, prompt
        assert len(logits) == len(ref_logits) == len(tokens)
        worst = max(rel_err(a, b) for a, b in zip(logits, ref_logits, strict=True))
        assert worst <= 1e-4, (prompt, worst)


def test_batch_generate_equals_generate(tiny_model):
    model, processor = tiny_model
    prompts = ["Hello", "<|image|>Describe it.", "One two three four five six seven"]
    images = [[], [synthetic_image(3, 96)], []]
    results = batch_generate(model, processor, prompts, images=images, max_tokens=12, prefill_step_size=4)
    for prompt, imgs, result in zip(prompts, images, results, strict=True):
        ref = generate(model, processor, prompt, images=imgs, max_tokens=12)
        assert result.tokens == ref.tokens and result.text == ref.text
        assert result.finish_reason == ref.finish_reason == "length"
    with pytest.raises(ValueError, match="images: 1 lists for 3 prompts"):
        batch_generate(model, processor, prompts, images=[[]])


def test_default_concurrency_from_memory_and_row_cost(tiny_model):
    model, _ = tiny_model
    text = model.config.text
    per_token, fixed = kv_cache_bytes(text, 8192)
    row = per_token * 8192 + fixed
    assert default_concurrency(text, 2 * 3 * row) == 3  # half the memory holds three rows
    assert default_concurrency(text, row) == 1  # never below one
    assert default_concurrency(text, 100 * row) == 8  # capped
    quantized = default_concurrency(text, 2 * 3 * row, kv_bits=4)
    assert quantized > 3  # a 4-bit cache costs under a third of a 16-bit one


# --- through the server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(loaded):  # noqa: F811 (the fixture imported above)
    from gemma_mlx.server import create_app

    srv = Server(create_app(*loaded, model_id=MODEL, max_concurrency=4))
    yield srv
    srv.close()


def chat(srv, messages, max_tokens, results, i):
    results[i] = srv.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0
    )


def concurrently(srv, jobs):
    results = [None] * len(jobs)
    threads = [threading.Thread(target=chat, args=(srv, m, n, results, i)) for i, (m, n) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_requests_equal_solo_answers(server, loaded):  # noqa: F811
    jobs = [
        ([{"role": "user", "content": "Hi"}], 20),
        ([{"role": "user", "content": "Tell me about the sea and the sky and the wind."}], 12),
        ([{"role": "user", "content": "Count to five."}], 30),
        ([{"role": "user", "content": "What is MLX? " * 8}], 16),
        ([{"role": "user", "content": "One more"}], 8),  # waits for a free row (4 at once)
    ]
    before = server.app.state.worker.metrics.snapshot()["batch_size"]
    results = concurrently(server, jobs)
    for (messages, n), got in zip(jobs, results, strict=True):
        ref, _ = reference(loaded, messages, n)
        assert (
            got.choices[0].message.content == parse_output(ref.text).content
            and got.usage.completion_tokens == n
        )
    after = server.app.state.worker.metrics.snapshot()["batch_size"]
    steps = after["steps"] - before["steps"]
    rows = after["mean"] * after["steps"] - (before["mean"] or 0) * before["steps"]
    assert rows / steps > 1.5  # the requests shared decode steps


def test_concurrent_conversations_reuse_their_own_histories(server, loaded):  # noqa: F811
    firsts = [
        [{"role": "user", "content": "Name a color."}],
        [{"role": "user", "content": "Name an animal."}],
    ]
    turn1 = concurrently(server, [(m, 10) for m in firsts])
    wait_idle(server)
    seconds = [
        m
        + [
            {"role": "assistant", "content": r.choices[0].message.content},
            {"role": "user", "content": "Why?"},
        ]
        for m, r in zip(firsts, turn1, strict=True)
    ]
    turn2 = concurrently(server, [(m, 10) for m in seconds])
    for first, messages, got in zip(firsts, seconds, turn2, strict=True):
        _, first_ids = reference(loaded, first, 1)
        ref, ids = reference(loaded, messages, 10)
        cached = got.usage.prompt_tokens_details.cached_tokens
        shared = next(i for i, (a, b) in enumerate(zip(first_ids, ids, strict=False)) if a != b)
        assert shared > 10 and shared <= cached < len(ids)  # its own first turn came from the cache
        assert got.choices[0].message.content == parse_output(ref.text).content  # as a cold run


def test_a_disconnect_frees_its_row_and_spares_the_others(server, loaded):  # noqa: F811
    worker = server.app.state.worker
    wait_idle(server)
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 500, "stream": True}
    others = [None]
    messages = [{"role": "user", "content": "Keep going"}]
    t = threading.Thread(target=chat, args=(server, messages, 40, others, 0))
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as running:
        lines = running.iter_lines()
        next(lines)
        t.start()
        deadline = time.time() + 20
        while worker.running < 2:
            assert time.time() < deadline
            time.sleep(0.01)
    deadline = time.time() + 10  # dropped: the server notices, the row leaves before the next step
    while worker.running > 1 or (worker.last is None or worker.last.finish_reason != "cancelled"):
        if not t.is_alive() and worker.running == 0:
            break
        assert time.time() < deadline, "the dropped stream kept its row"
        time.sleep(0.01)
    t.join(60)
    ref, _ = reference(loaded, messages, 40)
    assert others[0].choices[0].message.content == parse_output(ref.text).content
