"""The OpenAI-compatible server, driven over loopback with the official `openai` client."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
import wave

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image
from reference import rewrite_config, save_tokenizer

from gemma_mlx import generate, load
from gemma_mlx.server import create_app

MODEL = "tiny-gemma"
KEY = "sk-test"


@pytest.fixture(scope="module")
def model_dir(unified, tmp_path_factory):
    out = tmp_path_factory.mktemp("server") / "ckpt"
    shutil.copytree(unified[0], out)
    save_tokenizer(out)
    ids = {t["content"]: t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    rewrite_config(out, lambda c: c.update(image_token_id=ids["<|image|>"], audio_token_id=ids["<|audio|>"]))
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


def test_chat_matches_generate(server, loaded):
    model, processor = loaded
    r = ask(server.client(), "Hello there", max_tokens=8)
    messages = [{"role": "user", "content": "Hello there"}]
    ref = generate(model, processor, messages, max_tokens=8)
    assert r.usage.prompt_tokens == len(processor.prepare(messages).ids)
    assert r.usage.completion_tokens == len(ref.tokens)
    assert r.choices[0].finish_reason == ref.finish_reason
    print(repr(r.choices[0].message.content), repr(ref.text))
