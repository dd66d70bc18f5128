"""The chat page at `GET /`, driven in a real headless Chromium by Playwright against live loopback
servers with tiny models: streamed answers, conversations in local storage, images and audio that
reach the model, stop, the API key, thinking and tool calls. Every request the page makes is
recorded: all must go to the server.

Set-up: `pip install -e ".[test]"` (Playwright's Python package) and a Chromium on PATH (Debian:
`apt-get install chromium`; `.ci/run` installs it) or named by GEMMA_MLX_CHROMIUM. Playwright never
downloads a browser here."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="the chat page's tests need Playwright")
pytest.importorskip("httpx")
pytest.importorskip("openai")  # test_server's helpers

import httpx
import soundfile as sf
from PIL import Image
from playwright.sync_api import expect
from test_server import Server, png_uri, wav_b64
from tiny import save_checkpoint

from gemma_mlx import load
from gemma_mlx.server import create_app
from gemma_mlx.server.webui import CSP

KEY = "sk-page"
MODEL = "tiny-gemma"
expect.set_options(timeout=30_000)  # a loaded 2-core machine


def chromium() -> str | None:
    """A Chromium this machine has: GEMMA_MLX_CHROMIUM, one on PATH, or Playwright's own if it was
    installed (`playwright install chromium`); None when there is none."""
    names = (os.environ.get("GEMMA_MLX_CHROMIUM"), "chromium", "chromium-browser", "google-chrome")
    for name in names:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        path = chromium()
        if path is None and not Path(p.chromium.executable_path).exists():
            pytest.skip("no Chromium: apt-get install chromium (or set GEMMA_MLX_CHROMIUM)")
        # a fake microphone (a beep) that needs no permission prompt
        args = ["--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
        b = p.chromium.launch(executable_path=path, args=args)
        yield b
        b.close()


class Page:
    """A fresh browser context on `server`'s page that records every request and every console
    message (a CSP violation would show there)."""

    def __init__(self, browser, server, key: str | None = KEY, **context) -> None:
        self.server = server
        self.context = browser.new_context(**context)
        if key is not None:
            self.context.add_init_script(
                f"if (!localStorage.getItem('gemma-mlx.key')) localStorage.setItem('gemma-mlx.key', {key!r})"
            )
        self.requests, self.console = [], []
        self.context.on("request", lambda r: self.requests.append(r))
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.console.append(m.text))
        self.page.on("pageerror", lambda e: self.console.append(f"page error: {e}"))

    def open(self):
        response = self.page.goto(self.server.url + "/")
        expect(self.page.locator("#model-name")).not_to_have_text("")
        return response

    def settings(self, **values) -> None:
        if self.page.locator("#settings").is_hidden():
            self.page.click("#toggle-settings")
        for name, value in values.items():
            self.page.fill(f"#set-{name}", str(value))

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def answered(self, n: int = 1):
        """The `n`-th answer, once its statistics are shown (the stream has ended)."""
        answer = self.page.locator(".msg.assistant").nth(n - 1)
        expect(answer.locator(".stats")).to_be_visible()
        expect(self.page.locator("#send")).to_be_visible()
        return answer

    def stored(self) -> list[dict]:
        return json.loads(self.page.evaluate("localStorage.getItem('gemma-mlx.conversations')"))

    def chat_bodies(self) -> list[dict]:
        return [r.post_data_json for r in self.requests if r.url.endswith("/v1/chat/completions")]

    def close(self) -> None:
        """Checks the page talked to nobody but the server and broke no rule of its CSP."""
        self.context.close()
        others = [
            r.url for r in self.requests if not r.url.startswith((self.server.url + "/", "data:", "blob:"))
        ]
        assert others == [], f"requests to other hosts: {others}"
        assert not [m for m in self.console if "Content Security Policy" in m or "page error" in m]


def stat(answer, key: str) -> int:
    return int(answer.locator(f".stats [data-k={key}]").inner_text().split()[0])


@pytest.fixture(scope="module")
def media_model(tmp_path_factory):
    """The tiny unified model (it sees and hears), with no end-of-sequence id: answers run to
    max_tokens, so a long one can be stopped."""
    out = save_checkpoint(tmp_path_factory.mktemp("webui") / "ckpt")
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": []}))
    return load(out)


@pytest.fixture(scope="module")
def server(media_model):
    srv = Server(create_app(*media_model, model_id=MODEL, api_key=KEY))
    yield srv
    srv.close()


def test_page_and_files_carry_a_strict_csp_and_can_be_turned_off(server, media_model):
    from starlette.testclient import TestClient

    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP and "connect-src 'self'" in CSP
    assert "default-src 'none'" in CSP and "unsafe-inline" not in CSP
    js = httpx.get(server.url + "/ui/app.js")
    assert (
        js.headers["content-type"].startswith("text/javascript") and "content-security-policy" in js.headers
    )
    assert httpx.get(server.url + "/ui/missing.js").status_code == 404
    # the Host guard accepts loopback names and IP addresses only (TestClient says "testserver")
    with TestClient(
        create_app(*media_model, model_id=MODEL, ui=False), base_url="http://localhost"
    ) as client:
        assert client.get("/").status_code == 404 and client.get("/ui/app.js").status_code == 404
        assert client.get("/health").status_code == 200


def test_serve_no_ui(tmp_path, monkeypatch):
    """`gemma-mlx serve` serves the page unless --no-ui (serving.run replaced: the app is kept)."""
    from starlette.testclient import TestClient
    from typer.testing import CliRunner

    import gemma_mlx.cli.serve as serve_cli
    from gemma_mlx.cli.app import app as cli

    apps = []
    monkeypatch.setattr(serve_cli, "run", lambda app, *a, **kw: apps.append(app))
    ckpt = save_checkpoint(tmp_path / "ckpt")
    for flags in ([], ["--no-ui"]):
        result = CliRunner().invoke(cli, ["serve", "--model", str(ckpt), *flags])
        assert result.exit_code == 0, result.output
        assert ("Chat page: http://127.0.0.1:8080/" in result.output) == (not flags)
    local = "http://localhost"
    with TestClient(apps[0], base_url=local) as on, TestClient(apps[1], base_url=local) as off:
        assert on.get("/").status_code == 200 and off.get("/").status_code == 404


def test_streamed_answers_and_conversations_that_survive_a_reload(browser, server):
    p = Page(browser, server, key=None)
    page = p.page
    page.goto(server.url + "/")
    # the key is asked once
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    expect(page.locator("#model-name")).to_have_text(MODEL)
    expect(page.locator("#key-dialog")).to_be_hidden()
    p.settings(temperature=0, max_tokens=12)
    page.fill("#input", "Hello")
    page.press("#input", "Shift+Enter")  # a new line, not a send
    page.type("#input", "there")
    assert page.input_value("#input") == "Hello\nthere"
    with page.expect_response("**/v1/chat/completions") as streamed:
        page.press("#input", "Enter")
    assert streamed.value.headers["content-type"].startswith("text/event-stream")
    answer = p.answered()
    # what the page shows and keeps is the server's answer to the same request
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello\nthere"}], "max_tokens": 12}
    ref = httpx.post(
        server.url + "/v1/chat/completions",
        json={**body, "temperature": 0},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ).json()
    [conv] = p.stored()
    assert conv["title"] == "Hello there"
    assert conv["messages"][1]["content"] == ref["choices"][0]["message"]["content"]
    assert stat(answer, "prompt") == ref["usage"]["prompt_tokens"] and stat(answer, "completion") == 12
    assert answer.locator(".stats [data-k=tps]").inner_text().endswith("tok/s")
    assert p.chat_bodies()[0]["stream"] is True and p.chat_bodies()[0]["temperature"] == 0

    # a second turn reuses the first from the prefix cache, and says so
    p.send("And more?")
    second = p.answered(2)
    assert stat(second, "cached") > 0
    # regenerate replaces the last answer; edit takes the last message back into the box
    page.click(".msg.assistant >> nth=1 >> .regenerate")
    p.answered(2)
    bodies = p.chat_bodies()
    assert len(bodies) == 3 and bodies[2] == bodies[1] and len(p.stored()[0]["messages"]) == 4
    page.click(".msg.user >> nth=1 >> .edit")
    assert page.input_value("#input") == "And more?" and len(p.stored()[0]["messages"]) == 2

    # the conversation, its title and the key survive a reload; rename, export, new, delete
    page.reload()
    expect(page.locator("#model-name")).to_have_text(MODEL)
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator(".msg.assistant .stats [data-k=prompt]")).to_be_visible()
    assert page.locator(".msg.user .text").inner_text() == "Hello\nthere"
    page.click("#conversations li >> .rename")
    page.fill(".rename-input", "Greetings")
    page.press(".rename-input", "Enter")
    page.reload()
    expect(page.locator("#conversations li .conv-title")).to_have_text(["Greetings"])
    with page.expect_download() as download:
        page.click("#conversations li >> .export")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["title"] == "Greetings" and [m["role"] for m in exported["messages"]] == [
        "user",
        "assistant",
    ]
    page.click("#new-chat")
    expect(page.locator("#conversations li")).to_have_count(2)
    page.click("#conversations li >> nth=1 >> .delete")
    expect(page.locator("#conversations li")).to_have_count(1)
    assert [c["title"] for c in p.stored()] == ["New chat"]
    p.close()


DROP = """([data, name, kind]) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], name, {type: "image/png"}));
    const event = kind === "paste"
        ? new ClipboardEvent("paste", {clipboardData: dt, bubbles: true})
        : new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true});
    document.querySelector(kind === "paste" ? "#input" : "#messages").dispatchEvent(event);
}"""


def test_images_and_audio_reach_the_model(browser, server, media_model, tmp_path):
    _, processor = media_model
    images = [Image.new("RGB", (100, 60), c) for c in ((255, 0, 0), (0, 128, 255), (20, 200, 20))]
    (tmp_path / "red.png").write_bytes(base64.b64decode(png_uri((255, 0, 0))[22:]))
    (tmp_path / "clip.wav").write_bytes(base64.b64decode(wav_b64(8000)))
    p = Page(browser, server)
    page = p.page
    p.open()
    p.settings(max_tokens=3)
    page.set_input_files("#image-file", str(tmp_path / "red.png"))  # the picker
    page.evaluate(DROP, [png_uri((0, 128, 255))[22:], "pasted.png", "paste"])
    page.evaluate(DROP, [png_uri((20, 200, 20))[22:], "dropped.png", "drop"])
    page.set_input_files("#audio-file", str(tmp_path / "clip.wav"))
    expect(page.locator("#pending img.thumb")).to_have_count(3)
    expect(page.locator("#pending audio")).to_have_count(1)
    p.send("What is this?")
    answer = p.answered()
    [body] = p.chat_bodies()
    parts = body["messages"][0]["content"]
    assert [x["type"] for x in parts] == ["image_url"] * 3 + ["input_audio", "text"]
    assert parts[0]["image_url"]["url"] == png_uri((255, 0, 0))
    # the audio went as a 16 kHz mono WAV with the file's samples
    sent, rate = sf.read(io.BytesIO(base64.b64decode(parts[3]["input_audio"]["data"])), dtype="int16")
    original, _ = sf.read(tmp_path / "clip.wav", dtype="int16")
    assert rate == 16000 and sent.shape == original.shape and np.abs(sent - original.astype(int)).max() <= 1
    # the server's usage counts the media's tokens: the same prompt through the processor
    clip = sf.read(io.BytesIO(base64.b64decode(parts[3]["input_audio"]["data"])), dtype="float32")[0]
    content = [{"type": "image", "image": im} for im in images]
    content += [
        {"type": "audio", "audio": clip, "sampling_rate": 16000},
        {"type": "text", "text": "What is this?"},
    ]
    ids = processor.prepare([{"role": "user", "content": content}]).ids
    model_cfg = media_model[0].config
    assert ids.count(model_cfg.image_token_id) > 0 and ids.count(model_cfg.audio_token_id) > 0
    assert stat(answer, "prompt") == len(ids)
    expect(page.locator(".msg.user img.thumb")).to_have_count(3)
    expect(page.locator("#pending > *")).to_have_count(0)

    # the microphone (Chromium's fake device): a recording becomes a WAV attachment
    page.click("#record")
    expect(page.locator("#record")).to_have_class("recording")
    time.sleep(1.0)
    page.click("#record")
    expect(page.locator("#pending audio")).to_have_count(1)
    url = page.get_attribute("#pending audio", "src")
    recorded, rate = sf.read(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert url.startswith("data:audio/wav;base64,") and rate == 16000 and 0.5 < len(recorded) / rate < 5
    p.close()


def test_stop_mid_answer_frees_the_server(browser, server):
    p = Page(browser, server)
    page = p.page
    p.open()
    p.settings(max_tokens=5000)
    p.send("Hello there")  # (its first tokens are plain text, shown as they come)
    # the answer streams in while the request runs
    expect(page.locator(".msg.assistant .markdown")).not_to_have_text("")
    expect(page.locator("#stop")).to_be_visible()
    page.click("#stop")
    expect(page.locator(".msg.assistant .stats [data-k=stopped]")).to_be_visible()
    worker = server.app.state.worker
    deadline = time.time() + 20
    while not worker.idle:
        assert time.time() < deadline, "the generation went on after stop"
        time.sleep(0.02)
    assert worker.last.finish_reason == "cancelled" and worker.last.stats.generation_tokens < 5000
    kept = p.stored()[0]["messages"][1]["content"]
    assert kept and page.locator(".msg.assistant .markdown").inner_text().strip()
    # the server is free: the next message is answered
    p.settings(max_tokens=3)
    p.send("Shorter, please")
    assert stat(p.answered(2), "completion") == 3
    p.close()


def test_a_wrong_api_key_shows_the_servers_error(browser, server):
    p = Page(browser, server, key=None)
    page = p.page
    page.goto(server.url + "/")
    expect(page.locator("#key-error")).to_have_text(
        "missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')"
    )
    page.fill("#key-input", "sk-wrong")
    page.press("#key-input", "Enter")
    expect(page.locator("#key-error")).to_have_text("incorrect API key")
    page.keyboard.press("Escape")  # closed without a good key: sending shows the server's error
    p.send("Hi")
    expect(page.locator(".msg.error")).to_contain_text("incorrect API key")
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    expect(page.locator("#key-dialog")).to_be_hidden()
    p.settings(max_tokens=2)
    page.click(".msg.error .regenerate")  # retry
    p.answered()
    assert page.evaluate("localStorage.getItem('gemma-mlx.key')") == KEY
    p.close()


# --- thinking and tools, with checkpoints whose greedy decoding really emits them ------------------


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    """After "<|turn>model\\n" (thinking on) the model thinks "Hmm." and answers "Sunny."; with
    thinking off it answers only (tests/tool_model.py's builder with these pieces)."""
    import tool_model

    path = tmp_path_factory.mktemp("thinking_model")
    pieces = ["<|channel>", "thought\nHmm.", "<channel|>", "Sunny."]
    with pytest.MonkeyPatch.context() as mp:  # build_tool_model reads these module globals
        mp.setattr(tool_model, "PIECES", pieces)
        mp.setattr(tool_model, "STOP", "<turn|>")
        tool_model.build_tool_model(path)
    srv = Server(create_app(*load(path), model_id="thinking-model"))
    yield srv
    srv.close()


def test_thinking_is_shown_folded_above_the_answer(browser, thinking_server):
    p = Page(browser, thinking_server, key=None)
    page = p.page
    p.open()
    page.check("#thinking")
    p.send("Weather?")
    answer = p.answered()
    thought = answer.locator("details.thought")
    expect(thought.locator(".thought-text")).to_have_text("Hmm.")
    assert thought.evaluate("d => d.open") is False  # folded
    expect(answer.locator(".markdown")).to_have_text("Sunny.")
    assert answer.evaluate("a => a.firstElementChild.tagName") == "DETAILS"  # above the answer
    assert p.chat_bodies()[0]["chat_template_kwargs"] == {"enable_thinking": True}
    page.uncheck("#thinking")
    p.send("And tomorrow?")
    second = p.answered(2)
    expect(second.locator(".markdown")).to_have_text("Sunny.")
    expect(second.locator("details.thought")).to_have_count(0)
    p.close()


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    from tool_model import build_tool_model

    path = tmp_path_factory.mktemp("tool_model")
    build_tool_model(path)
    srv = Server(create_app(*load(path), model_id="tool-model"))
    yield srv
    srv.close()


def test_a_tool_call_and_its_result_are_shown(browser, tool_server):
    from tool_model import CALL_ARGUMENTS, CALL_NAME, TOOL

    p = Page(browser, tool_server, key=None)
    page = p.page
    p.open()
    p.settings(tools="[not json", max_tokens=40)
    p.send("Weather in Paris?")
    expect(page.locator("#tools-error")).to_contain_text("Tools:")  # refused before sending
    assert p.chat_bodies() == []
    p.settings(tools=json.dumps([TOOL], indent=2))
    page.click("#send")
    call = p.answered().locator(".tool-call")
    expect(call.locator(".tool-head")).to_have_text(f"Tool call: {CALL_NAME}")
    assert json.loads(call.locator(".tool-args").inner_text()) == CALL_ARGUMENTS
    call.locator(".tool-result-input").fill('{"temp_c": 21}')
    call.locator(".send-result").click()
    expect(page.locator(".msg.tool .tool-head")).to_have_text(f"Result of {CALL_NAME}")
    expect(page.locator(".msg.tool .tool-body")).to_have_text('{"temp_c": 21}')
    p.answered(2)
    first, second = p.chat_bodies()
    assert first["tools"] == [TOOL]
    call_id = second["messages"][1]["tool_calls"][0]["id"]
    assert second["messages"][2] == {"role": "tool", "tool_call_id": call_id, "content": '{"temp_c": 21}'}
    p.close()


SEEDED = {
    "id": "seeded",
    "title": "Seeded",
    "created": 0,
    "messages": [
        {"role": "user", "text": "Show me"},
        {
            "role": "assistant",
            "content": "A **table**:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n<img src=x onerror=alert(1)>\n"
            "[ok](https://example.com) [bad](javascript:alert(1))\n\n"
            "```python\ndef f(x):\n    return x + 1  # one more\n```",
            "stats": {"tps": 12.5, "prompt": 40, "cached": 32, "completion": 20, "acceptance": 0.75},
        },
    ],
}


def test_markdown_code_copy_dark_mode_and_phone_width(browser, server):
    p = Page(browser, server, viewport={"width": 390, "height": 844}, color_scheme="dark")
    page = p.page
    p.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page.goto(server.url + "/")
    page.evaluate(f"localStorage.setItem('gemma-mlx.conversations', JSON.stringify([{json.dumps(SEEDED)}]))")
    page.reload()
    answer = page.locator(".msg.assistant")
    expect(answer.locator("table td")).to_have_text(["1", "2"])
    # model output is text, never markup
    expect(answer.locator(".markdown img")).to_have_count(0)
    expect(answer.locator(".markdown")).to_contain_text("<img src=x onerror=alert(1)>")
    expect(answer.locator(".markdown a")).to_have_count(1)  # only http(s) and mailto links
    assert answer.locator(".markdown a").get_attribute("rel") == "noopener noreferrer"
    expect(answer.locator(".markdown")).to_contain_text("[bad](javascript:alert(1))")
    expect(answer.locator(".code .tok-kw").first).to_have_text("def")
    expect(answer.locator(".code .tok-com")).to_have_text("# one more")
    answer.locator(".code .copy").click()
    expect(answer.locator(".code .copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "def f(x):\n    return x + 1  # one more"
    stats = answer.locator(".stats")
    expect(stats).to_contain_text("12.5 tok/s")
    expect(stats.locator("[data-k=cached]")).to_have_text("32 cached")
    expect(stats.locator("[data-k=acceptance]")).to_have_text("draft 75% accepted")
    # dark mode follows the system's; at phone width the conversation list slides in from a menu
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(22, 24, 28)"
    assert page.locator("#sidebar").bounding_box()["x"] < 0
    page.click("#menu")
    expect(page.locator("#sidebar")).to_be_in_viewport()
    page.click("#conversations .conv-title")
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    p.close()
