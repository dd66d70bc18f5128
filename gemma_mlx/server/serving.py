"""Running the app on uvicorn: connection limits, read timeouts and shutdown on signals.

- A connection must deliver a whole request (headers and body) within `request_timeout` seconds
  of opening, or of its previous response; silent, slow-drip and half-sent requests are closed.
  Idle keep-alive connections close after `keep_alive` seconds. At most `max_connections` are
  served at once (beyond: uvicorn answers 503).
- SIGTERM/SIGINT cancel the running generation and the queued ones (their clients get what was
  generated, finish reason "cancelled"), so the server exits within a few seconds; a second signal
  exits at once.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_TIMEOUT = 30.0
KEEP_ALIVE = 5
MAX_CONNECTIONS = 256


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for reading each request."""

    request_timeout = REQUEST_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the request is in: generation may take as long as it takes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _read_timed_out(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()  # connection_lost tells a waiting app that the client is gone


class Server(uvicorn.Server):
    """uvicorn's server, cancelling generations on the first signal and exiting on the second."""

    def __init__(self, config: uvicorn.Config, worker: Any) -> None:
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit:
            os._exit(128 + sig)  # a second signal: at once, as the user asked twice
        self.worker.close()
        super().handle_exit(sig, frame)


def run(
    app: Any,
    host: str,
    port: int,
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    keep_alive: int = KEEP_ALIVE,
    max_connections: int = MAX_CONNECTIONS,
) -> None:
    """Serve `app` (from `create_app`) until a signal."""
    protocol = type("Protocol", (TimedH11Protocol,), {"request_timeout": request_timeout})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        http=protocol,
        timeout_keep_alive=keep_alive,
        limit_concurrency=max_connections,
        timeout_graceful_shutdown=3,
        h11_max_incomplete_event_size=64 << 10,  # request line and headers
    )
    try:
        Server(config, app.state.worker).run()
    except KeyboardInterrupt:  # uvicorn raises the SIGINT it caught again once it has shut down
        pass
