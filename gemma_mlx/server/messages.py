"""OpenAI chat messages -> the processor's messages (text, image and audio parts, tool turns)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..media import SAMPLE_RATE, MediaError, load_audio, load_image
from .schema import APIError, AudioPart, ImagePart, Message, TextPart

_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S
)


def _b64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: invalid base64 data", param, "invalid_value") from None


def _image_source(url: str, param: str, allow_files: Sequence[Path]) -> bytes | Path:
    """The bytes of a data URI, or a local file under one of the `allow_files` directories."""
    if url.startswith("data:"):
        m = _DATA_URI.match(url)
        if m is None:
            raise APIError(400, f"{param}: expected a base64 data URI (data:image/...;base64,...)", param)
        if not (m["mime"] or "").startswith("image/"):
            raise APIError(400, f"{param}: the data URI is {m['mime'] or 'untyped'}, not an image", param)
        return _b64(m["data"], param)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp"):
        raise APIError(
            400, f"{param}: remote URLs are not fetched; send the image as a base64 data: URI", param
        )
    if parsed.scheme not in ("", "file"):
        raise APIError(400, f"{param}: unsupported URL scheme {parsed.scheme!r}", param)
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()
    if not allow_files:
        raise APIError(
            400, f"{param}: local files are refused (the server has no --allow-files directory)", param
        )
    resolved = path.resolve()
    if not any(resolved.is_relative_to(d) for d in allow_files):
        raise APIError(400, f"{param}: {path} is outside the --allow-files directories", param)
    if not resolved.is_file():
        raise APIError(400, f"{param}: {path}: no such file", param)
    return resolved


def image_part(url: str, param: str, allow_files: Sequence[Path]) -> dict:
    """An image part from a data URI or an allowed local path (every API's images come here)."""
    try:
        return {"type": "image", "image": load_image(_image_source(url, param, allow_files))}
    except MediaError as e:
        raise APIError(
            400, f"{param}: {str(e).replace('<bytes>', 'the data')}", param, "invalid_value"
        ) from None


def audio_part(data: str, param: str) -> dict:
    """An audio part from base64 data (WAV, MP3, FLAC...: the container is read from the data)."""
    try:
        clip = load_audio(_b64(data, param))
    except MediaError as e:
        raise APIError(
            400, f"{param}: {str(e).replace('<bytes>', 'the data')}", param, "invalid_value"
        ) from None
    return {"type": "audio", "audio": clip, "sampling_rate": SAMPLE_RATE}


def _part(part: TextPart | ImagePart | AudioPart, param: str, allow_files: Sequence[Path]) -> dict:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        return image_part(part.image_url.url, param + ".image_url.url", allow_files)
    return audio_part(part.input_audio.data, param + ".input_audio.data")


def parse_arguments_json(text: str, param: str) -> dict:
    """A tool call's JSON arguments text as an object (400 naming `param` otherwise)."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise APIError(400, f"{param}: not valid JSON ({e})", param) from None
    if not isinstance(value, dict):
        raise APIError(400, f"{param}: expected a JSON object", param)
    return value


def convert_messages(messages: Sequence[Message], allow_files: Sequence[Path] = ()) -> list[dict]:
    """Messages as the processor and chat template take them; media decoded (400s name the part).

    Images become PIL images, audio a 16 kHz waveform; an assistant's `tool_calls` carry their
    arguments as objects (the template writes them in Gemma's own syntax); a tool message keeps
    its `tool_call_id` and `name`."""
    out, names = [], {}  # tool call id -> function name, for the tool results that follow
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if isinstance(m.content, list):
            if m.role != "user" and any(not isinstance(p, TextPart) for p in m.content):
                raise APIError(400, f"{param}.content: only user messages may hold images or audio", param)
            content = [_part(p, f"{param}.content[{j}]", allow_files) for j, p in enumerate(m.content)]
        else:
            content = m.content if m.content is not None else ""
        msg: dict = {"role": m.role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": parse_arguments_json(
                            c.function.arguments, f"{param}.tool_calls[{j}].function.arguments"
                        ),
                    },
                }
                for j, c in enumerate(m.tool_calls)
            ]
            names.update((c.id, c.function.name) for c in m.tool_calls if c.id)
        if m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id
            name = m.name or names.get(m.tool_call_id)
            if name:
                msg["name"] = name
        out.append(msg)
    return out
