"""`gemma-mlx serve`: an OpenAI-compatible HTTP server for one model (see `create_app`)."""

from .app import MAX_BODY_BYTES, MAX_QUEUE, create_app

__all__ = ["MAX_BODY_BYTES", "MAX_QUEUE", "create_app"]
