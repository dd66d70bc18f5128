"""What every API route does before its own work: the API key, the JSON body, the model name."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from . import limits
from .conversation import ClientGone
from .schema import APIError, validation_error


class Front:
    """Request checks shared by all routes. `model_ids`: the served names (the model's id first,
    then its aliases); `any_model`: answer whatever name a client sends; `keys`: the accepted API
    keys (none: no key needed)."""

    def __init__(
        self, *, model_ids: Sequence[str], any_model: bool, keys: Sequence[str], max_body_bytes: int
    ) -> None:
        self.model_ids, self.any_model = list(model_ids), any_model
        self.keys, self.max_body_bytes = list(keys), max_body_bytes

    def authorize(self, request: Request) -> str:
        """`Authorization: Bearer KEY` (OpenAI clients) or `x-api-key: KEY` (Anthropic clients);
        returns the prefix-cache partition of the key's clients ("" without keys), so one key's
        clients cannot learn another's prompts from cache timings or `cached_tokens`."""
        if not self.keys:
            return ""
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not given:
            raise APIError(
                401,
                "missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                None,
                "invalid_api_key",
            )
        # every key is compared (constant time each), so timing tells nothing about which matched
        hits = [secrets.compare_digest(given.encode(), k.encode()) for k in self.keys]
        if not any(hits):
            raise APIError(401, "incorrect API key", None, "invalid_api_key")
        return str(hits.index(True))

    async def read_json(self, request: Request) -> Any:
        """The body's JSON (bounded in size, nesting and strings: `limits.parse_body`)."""
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body over {limit} bytes", None, "request_too_large")
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise APIError(413, f"request body over {limit} bytes", None, "request_too_large")
        except ClientDisconnect:  # closed while sending (or by the read timeout)
            raise ClientGone from None
        return limits.parse_body(bytes(body))

    def parse(self, cls: type, body: Any) -> Any:
        """The body as `cls` (a pydantic model with a `model` field); 400/404 naming the field."""
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", None, "invalid_value")
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None
        self.check_model(req.model)
        return req

    def serves(self, name: str) -> bool:
        return self.any_model or name in self.model_ids

    def check_model(self, name: str) -> None:
        if not self.serves(name):
            served = ", ".join(repr(m) for m in self.model_ids)
            raise APIError(
                404, f"model {name!r} does not exist (this server has {served})", "model", "model_not_found"
            )
