"""OpenAI chat messages -> the processor's messages (text, image, audio and video parts, tool turns)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..media import SAMPLE_RATE, MediaBudget, MediaError, load_audio, load_image
from ..video import open_video
from .schema import APIError, AudioPart, ImagePart, Message, TextPart, VideoPart

MAX_PATH = 4096  # Linux's PATH_MAX
_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S
)


def _b64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: invalid base64 data", param, "invalid_value") from None


def _image_source(url: str, param: str, allow_files: Sequence[Path], kind: str = "image") -> bytes | Path:
    """The bytes of a data URI, or a local file under one of the `allow_files` directories."""
    if url.startswith("data:"):
        m = _DATA_URI.match(url)
        if m is None:
            raise APIError(400, f"{param}: expected a base64 data URI (data:{kind}/...;base64,...)", param)
        if not (m["mime"] or "").startswith(f"{kind}/"):
            article = "an" if kind[0] in "aeiou" else "a"
            raise APIError(
                400, f"{param}: the data URI is {m['mime'] or 'untyped'}, not {article} {kind}", param
            )
        return _b64(m["data"], param)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp"):
        raise APIError(
            400, f"{param}: remote URLs are not fetched; send the {kind} as a base64 data: URI", param
        )
    if parsed.scheme not in ("", "file"):
        raise APIError(400, f"{param}: unsupported URL scheme {parsed.scheme!r}", param)
    if not allow_files:
        raise APIError(
            400, f"{param}: local files are refused (the server has no --allow-files directory)", param
        )
    name = unquote(parsed.path) if parsed.scheme == "file" else url
    # the messages below never show the resolved path (it would reveal the server's directories)
    if "\x00" in name or len(name) > MAX_PATH:
        raise APIError(400, f"{param}: not a valid file path (NUL byte or over {MAX_PATH} characters)", param)
    try:
        resolved = Path(name).expanduser().resolve()
        inside = any(resolved.is_relative_to(d) for d in allow_files)
        found = inside and resolved.is_file()
    except (OSError, RuntimeError, ValueError):  # a name too long, a symlink loop, ...
        raise APIError(400, f"{param}: not a readable file path", param) from None
    if not inside:
        raise APIError(400, f"{param}: the file is outside the --allow-files directories", param)
    if not found:
        raise APIError(400, f"{param}: no such file under the --allow-files directories", param)
    return resolved


def image_part(url: str, part: str, field: str, allow_files: Sequence[Path]) -> dict:
    """An image part from a data URI or an allowed local path (every API's images come here).
    `part` names the part in errors and `part + field` the URL. The part holds the undecoded
    source: `decode_media` charges the request's `MediaBudget` for every part from its header,
    then decodes them."""
    param = part + field
    return {"type": "image", "image": _image_source(url, param, allow_files), "part": part, "param": param}


def audio_part(data: str, part: str, field: str) -> dict:
    """An audio part from base64 data (WAV, MP3, FLAC...: the container is read from the data),
    undecoded like `image_part`'s."""
    param = part + field
    return {"type": "audio", "audio": _b64(data, param), "part": part, "param": param}


def media_parts(messages: Sequence[dict]) -> list[dict]:
    """The image and audio parts of processor messages, in prompt order."""
    return [
        p
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if p["type"] in ("image", "audio")
    ]


def decode_media(messages: Sequence[dict], budget: MediaBudget) -> list[dict]:
    """The messages with their media decoded (images as PIL images, audio as 16 kHz waveforms).
    Every part is charged to `budget` from its header before any is decoded, so one request cannot
    make the server decode more than the budget; errors are 400s naming the part."""
    parts = media_parts(messages)
    for p in parts:
        with _named(p):
            if p["type"] == "image":
                budget.add_image(p["image"])
            else:
                budget.add_audio(p["audio"])
    decoded = {}
    for p in parts:
        with _named(p):
            if p["type"] == "image":
                decoded[id(p)] = {"type": "image", "image": load_image(p["image"])}
            else:
                clip = load_audio(p["audio"])
                decoded[id(p)] = {"type": "audio", "audio": clip, "sampling_rate": SAMPLE_RATE}
    if not parts:
        return list(messages)
    return [
        {**m, "content": [decoded.get(id(p), p) for p in m["content"]]}
        if isinstance(m.get("content"), list)
        else m
        for m in messages
    ]


@contextlib.contextmanager
def _named(part: dict) -> Iterator[None]:
    """A `MediaError` of `part` as a 400 naming its field (never the server's file paths)."""
    try:
        yield
    except MediaError as e:
        param, source = part.get("param"), part.get(part["type"])
        message = str(e).replace("<bytes>", "the data")
        if isinstance(source, Path):  # the resolved path would show the server's directories
            message = message.replace(str(source), "the file")
        raise APIError(400, f"{param}: {message}", param, "invalid_value") from None


def video_part(url: str, param: str, allow_files: Sequence[Path] = ()) -> dict:
    """A processor message part `{"type": "video", "video": bytes | Path}` from a `video_url` URL (a
    base64 `data:video/...` URI, or a path under one of `allow_files`), its container and video
    stream checked now: bad input is an APIError 400 naming `param`. For any endpoint whose
    schema carries a video (the frames are sampled when `Processor.prepare` gets the part)."""
    try:
        src = _image_source(url, param, allow_files, "video")
        open_video(src).close()
    except MediaError as e:
        message = str(e).replace("<bytes>", "the data")
        raise APIError(400, f"{param}: {message}", param, "invalid_value") from None
    return {"type": "video", "video": src}


def _part(
    part: TextPart | ImagePart | AudioPart | VideoPart, param: str, allow_files: Sequence[Path]
) -> dict:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, VideoPart):
        return video_part(part.video_url.url, param + ".video_url.url", allow_files)
    if isinstance(part, ImagePart):
        return image_part(part.image_url.url, param, ".image_url.url", allow_files)
    return audio_part(part.input_audio.data, param, ".input_audio.data")


def parse_arguments_json(text: str, param: str) -> dict:
    """A tool call's JSON arguments text as an object (400 naming `param` otherwise)."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise APIError(400, f"{param}: not valid JSON ({e})", param) from None
    if not isinstance(value, dict):
        raise APIError(400, f"{param}: expected a JSON object", param)
    return value


def convert_messages(
    messages: Sequence[Message], allow_files: Sequence[Path] = (), escape: Callable[[str], str] = str
) -> list[dict]:
    """Messages as the processor and chat template take them (400s name the part).

    Images and audio stay undecoded parts until `decode_media`; a video is its bytes or file
    (checked to open; frames are sampled when the prompt is prepared). An assistant's
    `tool_calls` carry their
    arguments as objects (the template writes them in Gemma's own syntax); a tool message keeps
    its `tool_call_id` and `name`. An assistant's text goes through `escape` (the tokenizer's):
    the chat template keeps assistant text as generated, but this server's answers never hold
    markup in `content`, so special-token text there is text a model wrote in plain tokens (or a
    client's), and must not come back as control tokens."""
    out, names = [], {}  # tool call id -> function name, for the tool results that follow
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if isinstance(m.content, list):
            if m.role != "user" and any(not isinstance(p, TextPart) for p in m.content):
                raise APIError(
                    400, f"{param}.content: only user messages may hold images, audio or video", param
                )
            content = [_part(p, f"{param}.content[{j}]", allow_files) for j, p in enumerate(m.content)]
        else:
            content = m.content if m.content is not None else ""
        if m.role == "assistant":
            if isinstance(content, str):
                content = escape(content)
            else:
                content = [{**p, "text": escape(p["text"])} if p["type"] == "text" else p for p in content]
        # OpenAI's "developer" role is the system instruction of newer models
        msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": content}
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
