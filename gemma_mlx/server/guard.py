"""Browser-facing checks, as ASGI middleware: a local server is reachable from every web page.

- `Host` must name the server: an IP address (the one the client connected to: DNS rebinding
  needs a name), `localhost`, or a name given with `--allow-host` ("*": any). A rebinding page's
  requests carry its own domain in `Host` and are refused.
- `Origin`, when a browser sends one, must be the server's own (the scheme and the `Host` the
  request names: the web UI at `/` is same-origin) or one given with `--allow-origin` ("*": any).
  Cross-site form posts and `fetch` calls from other pages are refused before anything runs.
- Requests with a body (POST) must say `Content-Type: application/json`, so no browser "simple
  request" (`text/plain`, forms) reaches an endpoint without a CORS preflight.
- CORS headers are sent only for origins in `--allow-origin`, which also get preflights answered
  (the headers the OpenAI and Anthropic SDKs send are allowed: `x-api-key`, `anthropic-version` ...).

What SDK clients send passes: they are not browsers (no `Origin`), name the host they connect to,
and post `application/json`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

LOCAL_NAMES = ("localhost",)
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = (
    "Authorization, Content-Type, x-api-key, anthropic-version, anthropic-beta, "
    "anthropic-dangerous-direct-browser-access, OpenAI-Organization, OpenAI-Project"
)


def host_name(host: str) -> str:
    """The name or address in a `Host` value, without the port ("[::1]:8080" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """The middleware; `allow_origins` and `allow_hosts` extend the defaults (see the module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        allow_origins: Sequence[str] = (),
        allow_hosts: Sequence[str] = (),
        error_body: Callable[[str, dict, int], dict] | None = None,
    ):
        """`error_body(path, body, status)`: a refusal's body in the shape of the API at `path`
        (OpenAI's error object by default)."""
        self.app = app
        self.error_body = error_body
        self.origins = {o.rstrip("/").lower() for o in allow_origins}
        self.hosts = {host_name(h) for h in allow_hosts}  # "name:port" allows the name

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":  # lifespan; the app has no websocket routes
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if host is not None and not self.host_ok(host_name(host)):
            await self.refuse(
                scope, send, 403, "host", f"the Host header {host!r} does not name this server (--allow-host)"
            )
            return
        origin = headers.get("origin")
        cross = origin is not None and not self.same_origin(origin, host, scope)
        allowed = origin is not None and ("*" in self.origins or origin.rstrip("/").lower() in self.origins)
        if cross and not allowed:
            await self.refuse(
                scope,
                send,
                403,
                "origin",
                f"cross-origin requests from {origin!r} are refused (--allow-origin)",
            )
            return
        cors = [] if not (cross and allowed) else [(b"access-control-allow-origin", origin.encode("latin-1"))]
        if scope["method"] == "OPTIONS" and cors:
            await send_preflight(send, cors)
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json" and not kind.endswith("+json"):
                await self.refuse(
                    scope,
                    send,
                    415,
                    "content-type",
                    "send the body as JSON with 'Content-Type: application/json'",
                )
                return
        if not cors:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors, (b"vary", b"Origin")]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def refuse(self, scope: Scope, send: Callable, status: int, what: str, message: str) -> None:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": what}}
        if self.error_body is not None:
            body = self.error_body(scope.get("path", ""), body, status)
        await send_json(send, status, body)

    def host_ok(self, name: str) -> bool:
        return name in LOCAL_NAMES or is_ip(name) or name in self.hosts or "*" in self.hosts

    @staticmethod
    def same_origin(origin: str, host: str | None, scope: Scope) -> bool:
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        return host is not None and origin.rstrip("/").lower() == f"{scheme}://{host.strip().lower()}"


async def send_json(send: Callable, status: int, value: dict) -> None:
    body = json.dumps(value).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_preflight(send: Callable, cors: list) -> None:
    headers = [
        *cors,
        (b"access-control-allow-methods", CORS_METHODS.encode()),
        (b"access-control-allow-headers", CORS_HEADERS.encode()),
        (b"access-control-max-age", b"600"),
        (b"vary", b"Origin"),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
