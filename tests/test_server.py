"""The OpenAI-compatible server, driven over loopback with the official `openai` client."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import socket
import threading
import time
import wave

import numpy as np
import pytest
import uvicorn
from PIL import Image
from tiny import rewrite_config, save_checkpoint

from gemma_mlx import generate, load
from gemma_mlx.server import create_app
from gemma_mlx.tools import parse_output

httpx = pytest.importorskip("httpx")  # the `test` extra: the fast tier runs without them
openai = pytest.importorskip("openai")

MODEL = "tiny-gemma"
KEY = "sk-test"
CONTEXT = 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = save_checkpoint(tmp_path_factory.mktemp("server") / "ckpt")
    # a small context, so that over-long prompts are cheap to make
    rewrite_config(out, lambda c: c["text_config"].update(max_position_embeddings=CONTEXT))
    # no end-of-sequence id: a random model would stop at random points; every answer here runs
    # to max_tokens, so lengths are known (a long one can be cancelled, a short one extended)
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": []}))
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load(model_dir)


class Server:
    """A uvicorn server on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.app = app
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def tmp_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("allowed")
    Image.new("RGB", (100, 60), (255, 0, 0)).save(d / "red.png")
    return d


@pytest.fixture(scope="module")
def server(loaded, tmp_files):
    model, processor = loaded
    srv = Server(
        create_app(
            model, processor, model_id=MODEL, api_key=KEY, allow_files=[tmp_files], max_body_bytes=2_000_000
        )
    )
    yield srv
    srv.close()


def png_uri(color=(255, 0, 0), size=(100, 60)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_b64(samples: int = 8000) -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(samples) / 10) * 8000).astype(np.int16).tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def ask(client, content, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, **kw
    )


def reference(loaded, messages, max_tokens, **kw):
    """The answer of the Python API, cold (a fresh cache), and its prompt's token ids."""
    model, processor = loaded
    inputs = processor.prepare(messages, **kw)
    return generate(model, processor, inputs, max_tokens=max_tokens), inputs.ids


def wait_idle(server, timeout=20.0):
    worker = server.app.state.worker
    deadline = time.time() + timeout
    while not worker.idle:
        assert time.time() < deadline, "the worker did not finish"
        time.sleep(0.01)
    return worker


def test_chat_matches_the_python_api(server, loaded):
    r = ask(server.client(), "Hello there", max_tokens=8)
    ref, ids = reference(loaded, [{"role": "user", "content": "Hello there"}], 8)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == parse_output(ref.text).content
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref.tokens))
    assert r.usage.total_tokens == len(ids) + len(ref.tokens)
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    timings = r.model_extra["timings"]
    assert timings["generation_tokens_per_second"] > 0 and timings["draft_tokens"] == 0


def test_streaming_equals_non_streaming(server):
    client = server.client()
    full = ask(client, "The quick brown fox", max_tokens=12)
    chunks = list(
        ask(client, "The quick brown fox", max_tokens=12, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert last.model_extra["timings"]["generation_tokens_per_second"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # on the wire: server-sent events ending with [DONE]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    raw = httpx.post(
        server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_text_completions(server, loaded):
    model, processor = loaded
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=6, temperature=0)
    ref = generate(model, processor, "Hello world", max_tokens=6)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.tokens)
    streamed = client.completions.create(
        model=MODEL, prompt="Hello world", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref.text


def test_image_data_uri_and_allowed_file(server, loaded, tmp_files):
    client = server.client()
    image = Image.new("RGB", (100, 60), (255, 0, 0))
    ref, ids = reference(
        loaded,
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}],
        5,
    )
    for url in (png_uri(), str(tmp_files / "red.png"), (tmp_files / "red.png").as_uri()):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]
        r = ask(client, content, max_tokens=5)
        assert r.usage.prompt_tokens == len(ids)
        assert r.choices[0].message.content == parse_output(ref.text).content
    model = loaded[0]
    assert ids.count(model.config.image_token_id) > 0


def test_audio_clip(server, loaded):
    from gemma_mlx.media import load_audio

    clip = load_audio(base64.b64decode(wav_b64()))
    ref, ids = reference(
        loaded,
        [
            {
                "role": "user",
                "content": [
                    {"type": "audio", "audio": clip, "sampling_rate": 16000},
                    {"type": "text", "text": "Hear"},
                ],
            }
        ],
        5,
    )
    content = [
        {"type": "input_audio", "input_audio": {"data": wav_b64(), "format": "wav"}},
        {"type": "text", "text": "Hear"},
    ]
    r = ask(server.client(), content, max_tokens=5)
    assert ids.count(loaded[0].config.audio_token_id) == 13
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == parse_output(ref.text).content


def test_health_models_and_auth(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in server.client().models.list()] == [MODEL]
    for key in ("", "sk-wrong"):
        with pytest.raises(openai.AuthenticationError) as e:
            ask(
                server.client(key=key or "unused", default_headers={} if key else {"Authorization": ""}),
                "Hi",
                max_tokens=1,
            )
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_prompt_over_the_context_is_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        ask(server.client(), " ".join(str(i) for i in range(500)), max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    assert "1024" in e.value.body["message"]


def post(server, body, headers=None, raw=None):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    if raw is not None:
        return httpx.post(server.url + "/v1/chat/completions", content=raw, headers=h)
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=h)


def chat(content="Hi", **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **kw}


def part(url):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]


BAD = [
    # (case, body, status, text the error must name)
    ("temperature type", chat(temperature="hot"), 400, "temperature"),
    ("temperature range", chat(temperature=5), 400, "temperature"),
    ("messages type", {"model": MODEL, "messages": "Hi"}, 400, "messages"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("no messages", {"model": MODEL}, 400, "messages"),
    (
        "unknown role",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "content type",
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    ("unknown part", chat([{"type": "video", "video": "x"}]), 400, "messages[0].content[0]"),
    ("n = 2", chat(n=2), 400, "n"),
    ("max_tokens type", chat(max_tokens="many"), 400, "max_tokens"),
    ("max_tokens zero", chat(max_tokens=0), 400, "max_tokens"),
    ("huge max_tokens", chat(max_tokens=10**9), 400, "max_tokens"),
    ("huge max_completion_tokens", chat(max_completion_tokens=10**9), 400, "max_completion_tokens"),
    ("stop type", chat(stop=[1, 2]), 400, "stop"),
    (
        "invalid base64 image",
        chat(part("data:image/png;base64,@@@")),
        400,
        "messages[0].content[0].image_url.url",
    ),
    ("non-image data URI", chat(part("data:text/plain;base64,aGVsbG8=")), 400, "not an image"),
    (
        "undecodable image",
        chat(part("data:image/png;base64,aGVsbG8=")),
        400,
        "messages[0].content[0].image_url.url",
    ),
    ("remote URL", chat(part("https://example.com/cat.png")), 400, "remote URLs are not fetched"),
    ("path outside allow-files", chat(part("/etc/hosts")), 400, "outside the --allow-files"),
    (
        "invalid base64 audio",
        chat([{"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}}]),
        400,
        "messages[0].content[0].input_audio.data",
    ),
    (
        "undecodable audio",
        chat([{"type": "input_audio", "input_audio": {"data": "aGVsbG8=", "format": "wav"}}]),
        400,
        "input_audio.data",
    ),
    (
        "image in a system message",
        {"model": MODEL, "messages": [{"role": "system", "content": part(png_uri())}]},
        400,
        "messages[0].content",
    ),
    (
        "tool_choice without tools",
        chat(tool_choice={"type": "function", "function": {"name": "f"}}),
        400,
        "tool_choice",
    ),
    (
        "bad tool arguments",
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{x"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "1"},
            ],
        },
        400,
        "messages[1].tool_calls[0].function.arguments",
    ),
    ("body not an object", [1, 2], 400, "JSON object"),
]


@pytest.mark.parametrize("case,body,status,named", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_4xx_naming_the_field(server, case, body, status, named):
    r = post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert named in error["message"] or named == error["param"], error
    assert error["type"] == "invalid_request_error"


def test_malformed_json_oversize_body_and_still_serving(server):
    r = post(server, None, raw=b'{"model": "tiny-gemma", "messages": [')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = post(server, chat("x" * 3_000_000))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert ask(server.client(), "Hi", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_disconnect_cancels_the_generation(server, loaded):
    worker = wait_idle(server)
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 900, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    wait_idle(server)
    assert worker.last.finish_reason == "cancelled" and worker.last.stats.generation_tokens < 200
    # a non-streaming request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/chat/completions",
            json=chat("Another story", max_tokens=900),
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=0.5,
        )
    wait_idle(server)
    assert worker.last.finish_reason == "cancelled" and worker.last.stats.generation_tokens < 200
    # the caches stay consistent: the same prompt now gives the cold answer
    r = ask(server.client(), "Tell me a long story", max_tokens=20)
    ref, _ = reference(loaded, [{"role": "user", "content": "Tell me a long story"}], 20)
    assert r.choices[0].message.content == parse_output(ref.text).content
    assert r.usage.prompt_tokens_details.cached_tokens > 0


def test_concurrent_streaming_clients_get_their_own_answers(server, loaded):
    prompts = [f"Hello {w} fox" for w in ("quick", "brown", "lazy", "dog")]
    expected = {
        p: parse_output(reference(loaded, [{"role": "user", "content": p}], 10)[0].text).content
        for p in prompts
    }
    results, errors = [], []

    def run(p):
        try:
            client = server.client()
            for _ in range(2):
                stream = ask(client, p, max_tokens=10, stream=True)
                results.append((p, "".join(c.choices[0].delta.content or "" for c in stream if c.choices)))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 8
    assert all(text == expected[p] for p, text in results)


def completion_ids(server, ids, max_tokens):
    r = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0)
    return r


def test_prefix_cache_extension_prefills_only_new_tokens(server, loaded):
    model, processor = loaded
    first = processor.encode_text("The lazy dog jumps over the quick brown fox.")
    ref = generate(model, processor, first, max_tokens=8)
    r = completion_ids(server, first, 8)
    assert r.choices[0].text == ref.text
    second = first + ref.tokens + processor.encode_text(" Hello world", add_bos=False)
    r = completion_ids(server, second, 8)
    assert r.usage.prompt_tokens_details.cached_tokens == len(first) + len(ref.tokens)
    assert r.choices[0].text == generate(model, processor, second, max_tokens=8).text  # a cold run
    # the same prompt again reuses all of it but the last token (decoding starts from that one)
    r = completion_ids(server, second, 8)
    assert r.usage.prompt_tokens_details.cached_tokens == len(second) - 1


def test_prefix_cache_reuses_the_prompt_when_the_answer_is_edited(server, loaded):
    """The answer (200 tokens) is longer than the rings' rollback slack (128): a request that
    diverges inside it can only resume from the snapshot taken at the end of the previous prompt."""
    model, processor = loaded
    client = server.client()
    history = [{"role": "user", "content": "Tell me about the lazy dog."}]
    first_ids = processor.prepare(history).ids
    r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=200, temperature=0)
    assert r.usage.completion_tokens == 200 > model.make_cache()[0].slack
    history += [
        {"role": "assistant", "content": "The lazy dog sleeps."},  # edited
        {"role": "user", "content": "And the fox?"},
    ]
    second_ids = processor.prepare(history).ids
    shared = next(i for i, (a, b) in enumerate(zip(first_ids, second_ids, strict=False)) if a != b)
    # the first prompt ends by opening an empty thought channel, which the history does not repeat
    assert processor.tokenizer.decode(first_ids[:shared]).endswith("<|turn>model\n")
    r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=10, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens == shared
    ref, _ = reference(loaded, history, 10)
    assert r.choices[0].message.content == parse_output(ref.text).content


def test_prefix_cache_keys_include_the_media(server, loaded):
    model, processor = loaded
    client = server.client()

    def turn(color):
        content = [
            {"type": "image_url", "image_url": {"url": png_uri(color)}},
            {"type": "text", "text": "Hue?"},
        ]
        return ask(client, content, max_tokens=4)

    red = turn((255, 0, 0))
    again = turn((255, 0, 0))
    blue = turn((0, 0, 255))
    image = Image.new("RGB", (100, 60), (0, 0, 255))
    ref, ids = reference(
        loaded,
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hue?"}]}],
        4,
    )
    assert again.usage.prompt_tokens_details.cached_tokens == len(ids) - 1
    assert again.choices[0].message.content == red.choices[0].message.content
    # another image: reuse stops where its block starts, and the answer is the cold one
    assert blue.usage.prompt_tokens_details.cached_tokens == ids.index(model.config.image_token_id)
    assert blue.choices[0].message.content == parse_output(ref.text).content


def test_queue_limit_answers_429(loaded):
    model, processor = loaded
    srv = Server(create_app(model, processor, model_id=MODEL, max_queue=1, max_concurrency=1))
    try:
        worker = srv.app.state.worker
        body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 900, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # (kept: dropping the iterator closes the stream)
            next(lines)  # generating now
            queued = []
            t = threading.Thread(target=lambda: queued.append(ask(srv.client(), "Hi", max_tokens=2)))
            t.start()
            deadline = time.time() + 10
            while worker.waiting < 1:
                assert time.time() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                ask(srv.client(), "Hi", max_tokens=2)
            assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        t.join(30)  # the running stream was dropped: the queued request is served
        assert queued and queued[0].usage.completion_tokens == 2
    finally:
        srv.close()


def test_prompt_cache_is_bounded_by_bytes_lru(loaded):
    import mlx.core as mx

    from gemma_mlx.generate import make_cache, prefill
    from gemma_mlx.processor import Inputs
    from gemma_mlx.prompt_cache import PromptCache, PromptKey

    model, processor = loaded

    def filled(ids):
        cache = make_cache(model)
        prefill(model, mx.array(ids, dtype=mx.int32), cache)
        return cache

    prompts = [processor.encode_text(t) for t in ("The quick brown fox", "Hello world, this", "The lazy dog")]
    one = sum(c.nbytes for c in filled(prompts[0]))
    store = PromptCache(int(2.5 * one))
    for ids in prompts:
        store.store(np.asarray(ids, np.int64), filled(ids))
    assert len(store) == 2 and store.nbytes <= 2.5 * one  # the oldest went first

    def shared(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    evicted = max(shared(prompts[0], p) for p in prompts[1:])  # only the BOS and maybe a word
    for ids, expect in ((prompts[0], evicted), (prompts[2], len(prompts[2]) - 1)):
        cache = make_cache(model)
        assert store.fetch(PromptKey.of(Inputs(ids), None, None), cache, len(ids) - 1) == expect
        assert all(c.offset == expect for c in cache)


def test_cli_serves_on_loopback(model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "gemma_mlx.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    bad = subprocess.run([*cmd, "--allow-files", str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 1 and "--allow-files" in bad.stderr and "no such directory" in bad.stderr
    proc = subprocess.Popen([*cmd, "--api-key", KEY], stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == [model_dir.name]
        r = client.chat.completions.create(
            model=model_dir.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert r.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/v1" in err and proc.returncode == 0


# --- tools and thinking, with checkpoints whose greedy decoding really emits them -------------------


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    from tool_model import build_tool_model

    path = tmp_path_factory.mktemp("tool_model")
    build_tool_model(path)
    model, processor = load(path)
    srv = Server(create_app(model, processor, model_id="tool-model"))
    yield srv, processor
    srv.close()


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    """The tool model's builder with other pieces: after "<|turn>model\n" (thinking on) it writes
    a thought and then the answer; after the empty thought channel (thinking off) the answer only."""
    import tool_model

    path = tmp_path_factory.mktemp("thinking_model")
    pieces = ["<|channel>", "thought\nHmm.", "<channel|>", "Sunny."]
    with pytest.MonkeyPatch.context() as mp:  # build_tool_model reads these module globals
        mp.setattr(tool_model, "PIECES", pieces)
        mp.setattr(tool_model, "STOP", "<turn|>")
        tool_model.build_tool_model(path)
    model, processor = load(path)
    srv = Server(create_app(model, processor, model_id="thinking-model"))
    yield srv
    srv.close()


def test_tool_call_round_trip(tool_server):
    from tool_model import CALL_ARGUMENTS, CALL_NAME, TOOL

    srv, processor = tool_server
    client = srv.client()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="tool-model", messages=messages, tools=[TOOL], max_tokens=30)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == CALL_NAME and call.id
    assert json.loads(call.function.arguments) == CALL_ARGUMENTS
    assert r.usage.prompt_tokens == len(processor.prepare(messages, tools=[TOOL]).ids)

    # streamed: one tool-call delta, no content, the same finish
    chunks = list(
        client.chat.completions.create(
            model="tool-model", messages=messages, tools=[TOOL], max_tokens=30, stream=True
        )
    )
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, CALL_NAME, CALL_ARGUMENTS)
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]

    # the tool's result goes back to the model, rendered by the template as Gemma's tool response
    result = {"temperature": 21, "sky": "clear"}
    followup = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    r = client.chat.completions.create(model="tool-model", messages=followup, tools=[TOOL], max_tokens=5)
    rendered = [
        *messages,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": CALL_NAME, "arguments": CALL_ARGUMENTS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "name": CALL_NAME, "content": json.dumps(result)},
    ]
    text = processor.apply_chat_template(rendered, tools=[TOOL])
    assert "<|tool_response>response:get_weather" in text
    assert r.usage.prompt_tokens == len(processor.prepare(rendered, tools=[TOOL]).ids)
    assert (
        r.usage.prompt_tokens_details.cached_tokens > len(processor.prepare(messages, tools=[TOOL]).ids) // 2
    )
    # tool_choice none: the tools are not declared
    r = client.chat.completions.create(
        model="tool-model", messages=messages, tools=[TOOL], tool_choice="none", max_tokens=1
    )
    assert r.usage.prompt_tokens == len(processor.prepare(messages).ids)


def test_truncated_call_and_forced_tool_choice(tool_server):
    from tool_model import TOOL

    srv, processor = tool_server
    client = srv.client()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    # cut off inside the call: its text comes back as content (no markup), finish_reason "length"
    r = client.chat.completions.create(model="tool-model", messages=messages, tools=[TOOL], max_tokens=3)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == 'call:get_weather{city:"'
    # required / a named function: with llguidance the call grammar forces the call (nothing is
    # added to the prompt); without it the call is opened after the generation prompt
    template = processor.apply_chat_template(messages, tools=[TOOL])
    checked = importlib.util.find_spec("llguidance") is not None
    for choice, forced in (
        ("required", "<|tool_call>call:"),
        ({"type": "function", "function": {"name": "get_weather"}}, "<|tool_call>call:get_weather{"),
    ):
        r = client.chat.completions.create(
            model="tool-model", messages=messages, tools=[TOOL], tool_choice=choice, max_tokens=1
        )
        prompt = template + ("" if checked else forced)
        assert r.usage.prompt_tokens == len(processor.encode_text(prompt, add_bos=False))


@pytest.mark.parametrize(
    "switch",
    [{"reasoning_effort": "high"}, {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}],
)
def test_thinking_goes_to_reasoning_content(thinking_server, switch):
    client = thinking_server.client()
    messages = [{"role": "user", "content": "Weather?"}]
    r = client.chat.completions.create(model="thinking-model", messages=messages, max_tokens=10, **switch)
    message = r.choices[0].message
    assert (message.content, message.model_extra["reasoning_content"]) == ("Sunny.", "Hmm.")
    assert r.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model="thinking-model", messages=messages, max_tokens=10, stream=True, **switch
        )
    )
    deltas = [
        (k, v)
        for c in chunks
        if c.choices
        for k, v in c.choices[0].delta.model_dump().items()
        if k in ("content", "reasoning_content") and v
    ]
    assert deltas == [("reasoning_content", "Hmm."), ("content", "Sunny.")]
    # thinking off: no thought, the answer only
    r = client.chat.completions.create(model="thinking-model", messages=messages, max_tokens=10)
    assert r.choices[0].message.content == "Sunny." and "reasoning_content" not in (
        r.choices[0].message.model_extra or {}
    )


def test_draft_model_speculates_every_request(causal, tmp_path_factory):
    """--draft: MTP for every request; greedy answers equal plain decoding, also when resuming from
    the prefix cache, and the acceptance is reported."""
    pytest.importorskip("torch")
    from test_drafter import pair  # the drafter tests' target + drafter pair (built by transformers)

    from gemma_mlx import load_drafter
    from gemma_mlx.draft_control import DraftControl

    target, _, drafter_dir, _ = pair.__wrapped__(causal, tmp_path_factory)

    model, processor = load(target)
    srv = Server(create_app(model, processor, model_id="t", drafter=load_drafter(drafter_dir)))
    # the server's draft controller with a bandwidth-bound cost model (a verify pass about one
    # step, as on a GPU) instead of this busy CPU's clock: whether it drafts is then free of timing
    # noise (a loaded CI run once timed drafting as not paying and decoded plainly)
    worker = srv.app.state.worker
    worker.draft_control = DraftControl(worker.draft_control.max_drafts, cost=lambda k: 1.0 + 0.1 * k)
    try:
        client = srv.client()
        first = processor.encode_text("The quick brown fox")
        for prompt in (first, first + processor.encode_text(" jumps over", add_bos=False)):
            r = client.completions.create(model="t", prompt=prompt, max_tokens=12, temperature=0)
            assert r.choices[0].text == generate(model, processor, prompt, max_tokens=12).text
            assert r.model_extra["timings"]["draft_tokens"] > 0
        assert r.usage.prompt_tokens_details.cached_tokens == len(first)
    finally:
        srv.close()


def test_quantized_kv_cache(loaded):
    """`--kv-bits 8`: answers equal the Python API's with the same cache, also when the prefix
    cache resumes a conversation from a quantized snapshot."""
    model, processor = loaded
    srv = Server(create_app(model, processor, model_id=MODEL, api_key=KEY, kv_bits=8, kv_group_size=32))
    try:
        client = srv.client()
        first = [{"role": "user", "content": "Hello there"}]
        r1 = client.chat.completions.create(model=MODEL, messages=first, temperature=0, max_tokens=6)
        ref = generate(model, processor, processor.prepare(first), max_tokens=6, kv_bits=8, kv_group_size=32)
        assert r1.choices[0].message.content == parse_output(ref.text).content
        second = [*first, {"role": "assistant", "content": r1.choices[0].message.content}]
        second.append({"role": "user", "content": "The quick brown fox"})
        r2 = client.chat.completions.create(model=MODEL, messages=second, temperature=0, max_tokens=6)
        assert r2.usage.prompt_tokens_details.cached_tokens > 0
        ref = generate(model, processor, processor.prepare(second), max_tokens=6, kv_bits=8, kv_group_size=32)
        assert r2.choices[0].message.content == parse_output(ref.text).content
    finally:
        srv.close()
