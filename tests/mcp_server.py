"""A real MCP server for the agent tests: `python mcp_server.py [NAME] [--http PORT]` (stdio, or
streamable HTTP on 127.0.0.1:PORT/mcp).

Its tools take the arguments the tiny tool model writes (`city`, `days`): `get_weather` answers
with text and a PNG image, `explode` raises, `nap` sleeps (for timeouts), `crash` kills the server,
`flaky` sleeps the first time and kills the server the second, `strict` declares `days` a string
(the model's integer fails the schema), `pid` gives the server's process id.
"""

from __future__ import annotations

import io
import os
import sys
import time

from mcp.server.mcpserver import Image, MCPServer
from PIL import Image as PILImage

WEATHER = "sunny, 21 C in {city} for {days} days"
STRIPES = (64, 48)  # the image's size

server = MCPServer(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "--http" else "weather")
calls = {"flaky": 0}


@server.tool()
def get_weather(city: str, days: int = 1) -> list:
    """Current weather in a city, with a forecast chart"""
    buf = io.BytesIO()
    PILImage.new("RGB", STRIPES, (30, 144, 255)).save(buf, "PNG")
    return [WEATHER.format(city=city, days=days), Image(data=buf.getvalue(), format="png")]


@server.tool()
def explode(city: str, days: int = 1) -> str:
    """Always fails"""
    raise RuntimeError(f"the weather station in {city} is on fire")


@server.tool()
def nap(city: str, days: int = 1) -> str:
    """Takes a minute"""
    time.sleep(60)
    return "rested"


@server.tool()
def crash(city: str, days: int = 1) -> str:
    """Kills its own server"""
    os._exit(3)


@server.tool()
def strict(city: str, days: str) -> str:
    """Wants days as a string"""
    return "ok"


@server.tool()
def flaky(city: str, days: int = 1) -> str:
    """Slow once, then fatal"""
    calls["flaky"] += 1
    if calls["flaky"] == 1:
        time.sleep(60)
    os._exit(3)


@server.tool()
def pid() -> int:
    """This server's process id"""
    return os.getpid()


if __name__ == "__main__":
    if "--http" in sys.argv:
        port = int(sys.argv[sys.argv.index("--http") + 1])
        server.run("streamable-http", host="127.0.0.1", port=port)
    else:
        server.run()
