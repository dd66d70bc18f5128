"""Screenshots of the chat page for the README: docs/webui-{light,dark,phone}.png.

The page is served by `create_app` with the tiny test checkpoint (tests/tiny.py); the conversation
shown is seeded into the browser's local storage, since a tiny random model writes noise. Needs
Playwright and a Chromium (`apt-get install chromium`). Run: python docs/webui_screenshots.py
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from test_server import Server  # noqa: E402
from tiny import save_checkpoint  # noqa: E402

from gemma_mlx import load  # noqa: E402
from gemma_mlx.server import create_app  # noqa: E402


def photo() -> str:
    """A small drawn landscape, as a PNG data URI."""
    img = Image.new("RGB", (320, 200))
    d = ImageDraw.Draw(img)
    for y in range(200):
        d.line([(0, y), (320, y)], fill=(90 + y // 3, 150 + y // 4, 235))
    d.ellipse([230, 30, 280, 80], fill=(255, 214, 90))
    d.polygon([(0, 200), (90, 90), (170, 200)], fill=(70, 110, 90))
    d.polygon([(110, 200), (210, 70), (320, 200)], fill=(50, 90, 75))
    d.polygon([(192, 94), (210, 70), (228, 94), (218, 90), (210, 96), (201, 90)], fill=(245, 245, 250))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


ANSWER = """It is a **mountain landscape** at midday:

- two green peaks, the right one with *snow* on its summit
- a clear blue sky, brighter towards the horizon
- the sun in the upper right corner

To find the sky's share of the picture:

```python
from PIL import Image

img = Image.open("landscape.png").convert("RGB")
blue = sum(1 for r, g, b in img.getdata() if b > 200 and b > r)  # sky pixels
print(f"sky: {blue / (img.width * img.height):.0%}")
```"""

CONVERSATIONS = [
    {
        "id": "demo",
        "title": "What is in this photo?",
        "created": 0,
        "messages": [
            {
                "role": "user",
                "text": "What is in this photo? And how would I measure how much of it is sky?",
                "attachments": [{"kind": "image", "url": photo(), "name": "landscape.png"}],
            },
            {
                "role": "assistant",
                "reasoning": "The picture shows two peaks, a sky gradient and a sun. For the sky's share, "
                "count blue-dominant pixels.",
                "content": ANSWER,
                "stats": {"tps": 31.4, "completion": 142, "prompt": 318, "cached": 0, "acceptance": 0.68},
            },
            {"role": "user", "text": "Is it sunny in Chamonix right now?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Chamonix"}'}],
                "stats": {"tps": 33.0, "completion": 14, "prompt": 512, "cached": 460, "acceptance": 0.86},
            },
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "name": "get_weather",
                "content": '{"sky": "clear", "temp_c": 4}',
            },
            {
                "role": "assistant",
                "content": "Yes: the sky over Chamonix is **clear**, at 4 °C.",
                "stats": {"tps": 32.1, "completion": 16, "prompt": 548, "cached": 526, "acceptance": 0.81},
            },
        ],
    },
    {"id": "b", "title": "Transcribe the voice memo", "created": 0, "messages": []},
    {"id": "c", "title": "Refactor the parser", "created": 0, "messages": []},
]

SHOTS = [
    ("webui-light.png", {"viewport": {"width": 1200, "height": 860}, "color_scheme": "light"}),
    ("webui-dark.png", {"viewport": {"width": 1200, "height": 860}, "color_scheme": "dark"}),
    (
        "webui-phone.png",
        {"viewport": {"width": 390, "height": 844}, "color_scheme": "light", "device_scale_factor": 2},
    ),
]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(create_app(*load(save_checkpoint(Path(tmp) / "ckpt")), model_id="tiny-gemma"))
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
                for name, options in SHOTS:
                    context = browser.new_context(**options)
                    page = context.new_page()
                    page.goto(srv.url + "/")
                    page.evaluate(
                        "([convs, settings]) => { localStorage.setItem('gemma-mlx.conversations', convs);"
                        " localStorage.setItem('gemma-mlx.settings', settings); }",
                        [json.dumps(CONVERSATIONS), json.dumps({"thinking": True})],
                    )
                    page.reload()
                    page.wait_for_selector(".msg.assistant .stats")
                    page.wait_for_function("document.querySelector('#model-name').textContent !== ''")
                    page.fill("#input", "Describe the voice memo I attach")
                    if name == "webui-light.png":
                        page.click("details.thought summary")
                    scroll = "m.scrollHeight" if name == "webui-dark.png" else "0"  # the tool call
                    page.evaluate(f"(m => m.scrollTop = {scroll})(document.querySelector('#messages'))")
                    page.screenshot(path=str(HERE / name))
                    context.close()
                browser.close()
        finally:
            srv.close()


if __name__ == "__main__":
    main()
