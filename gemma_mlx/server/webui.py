"""The chat page at `GET /`: static files shipped in `gemma_mlx/webui` (no build step, no CDN).

The page talks only to this server (`/v1/models`, `/v1/chat/completions`); the Content-Security-
Policy sent with every file forbids anything else: no remote scripts, styles, fonts, images or
connections, no inline script, no framing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from .schema import APIError

STATIC = Path(__file__).resolve().parent.parent / "webui"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# media-src/img-src allow data: and blob: for the previews of attachments the user picked; the
# page's own requests (connect-src) go to this origin only
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
    "Cache-Control": "no-cache",
}


def add_webui(app: FastAPI) -> None:
    """Serve the page at `/` and its files at `/ui/NAME` (read once, at start)."""
    files = {p.name: (p.read_bytes(), TYPES[p.suffix]) for p in STATIC.iterdir() if p.suffix in TYPES}

    def send(name: str) -> Response:
        if name not in files:
            raise APIError(404, f"/ui/{name}: no such file", None, "not_found")
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return send("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        return send(name)
