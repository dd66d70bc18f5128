"""A real MCP server for the agent tests, run over stdio: `python mcp_server.py [NAME]`.

Its tools take the arguments the tiny tool model writes (`city`, `days`): `get_weather` answers
with text and a PNG image, `explode` raises, `nap` sleeps (for timeouts), `crash` kills the server,
`strict` declares `days` a string (the model's integer fails the schema).
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

server = MCPServer(sys.argv[1] if len(sys.argv) > 1 else "weather")


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


if __name__ == "__main__":
    server.run()
