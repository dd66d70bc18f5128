"""The processor: tokenizer, chat template and generation settings of one checkpoint."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import numpy as np

from . import media
from .text import ChatTemplate, Tokenizer, read_json
from .video import DEFAULT_FRAMES, DEFAULT_SOFT_TOKENS, batch_videos, expand_video, preprocess_video

# Inputs fields that describe the prompt rather than feed the model
_NOT_MODEL_INPUTS = ("ids", "num_frames_per_video", "video_timestamps")


@dataclass
class Inputs:
    """A prompt ready for the model: token ids and, when it has media, the reference's tensors."""

    ids: list[int]
    pixel_values: np.ndarray | None = None  # [n, max_soft_tokens, 6912]
    image_position_ids: np.ndarray | None = None  # [n, max_soft_tokens, 2]
    input_features: np.ndarray | None = None  # [m, frames, 640]
    input_features_mask: np.ndarray | None = None  # [m, frames]
    pixel_values_videos: np.ndarray | None = None  # [frames of all videos, max_soft_tokens, 6912]
    video_position_ids: np.ndarray | None = None  # [frames of all videos, max_soft_tokens, 2]
    num_frames_per_video: list[int] | None = None
    video_timestamps: list[list[float]] | None = None  # seconds of each sampled frame, per video

    @property
    def has_media(self) -> bool:
        return any(v is not None for v in (self.pixel_values, self.input_features, self.pixel_values_videos))

    def model_kwargs(self) -> dict:
        return {k: mx.array(v) for k, v in vars(self).items() if k not in _NOT_MODEL_INPUTS and v is not None}


PromptKind = Literal["text", "ids", "messages"]


def classify_prompt(prompt: Any) -> tuple[PromptKind, Any]:
    """What a prompt is (plain text, token ids, or chat messages) and the prompt itself as a str or
    a list (iterators read once, arrays as Python ints); anything else is a ValueError."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        return "text", prompt
    if isinstance(prompt, (bytes, Mapping)) or not isinstance(prompt, Iterable):
        raise ValueError(
            f"prompt must be a string, a list of token ids or a list of chat message dicts, "
            f"not {type(prompt).__name__}"
        )
    items = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)  # numpy / mlx arrays
    if not items:
        raise ValueError("prompt is empty")
    if all(isinstance(m, Mapping) for m in items):
        for n, m in enumerate(items):
            if "role" not in m:
                raise ValueError(f"chat message {n} has no 'role'")
        return "messages", items
    for i in items:
        if isinstance(i, (bool, np.bool_)) or not hasattr(i, "__index__") or operator.index(i) < 0:
            raise ValueError(
                f"prompt must be a string, a list of token ids or a list of chat message dicts; "
                f"{i!r} is not a token id"
            )
    return "ids", [operator.index(i) for i in items]


def _escaped(tokenizer: Tokenizer, data: Any) -> Any:
    """Chat data with every string escaped for `tokenizer` (dict keys and non-text values kept)."""
    if isinstance(data, str):
        return tokenizer.escape(data)
    if isinstance(data, Mapping):
        return {k: _escaped(tokenizer, v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_escaped(tokenizer, v) for v in data]
    return data


ROLES = ("system", "developer", "user", "assistant", "model", "tool")
PART_TYPES = ("text", "image", "audio", "video")


def check_messages(messages: Sequence[Any]) -> None:
    """Raise ValueError naming the message (and part) that a chat template would render wrongly or
    as an empty turn: not a dict, an unknown role, content that is neither a string nor a list of
    parts, a part of an unsupported type or a text part without text."""
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(
                f"message {i}: expected a dict with 'role' and 'content', not {type(m).__name__}"
            )
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i}: role {m.get('role')!r} is not one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None and not (m["role"] in ("assistant", "model") and m.get("tool_calls")):
            raise ValueError(f"message {i} ({m['role']}): no 'content'")
        if content is None or isinstance(content, str):
            continue
        if m["role"] == "tool":  # a tool result may be any JSON value
            continue
        if not isinstance(content, list):
            raise ValueError(
                f"message {i}: 'content' must be a string or a list of parts, not {type(content).__name__}"
            )
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind not in PART_TYPES:
                raise ValueError(
                    f"message {i}, part {j}: type {kind!r} is not one of {', '.join(PART_TYPES)}"
                )
            if kind == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"message {i}, part {j}: a text part needs 'text' (a string)")


class Processor:
    """Turns prompts (text, token ids, chat messages) into token ids for one checkpoint."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate,
        generation_config: dict | None = None,
        video_token_id: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.generation_config = generation_config or {}
        # `<|video|>`: the tokenizer's token if it has one, else the config's id (the reference adds
        # the token to the tokenizer at run time; the 12B's config names 258884)
        self.video_token_id = tokenizer.token_to_id(media.VIDEO_TOKEN)
        if self.video_token_id is None:
            self.video_token_id = video_token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> Processor | None:
        """Load from a checkpoint directory; None when it has no tokenizer files. Without a chat
        template of its own the checkpoint gets ours (Gemma 3's when its vocabulary has
        <start_of_turn>, else Gemma 4's)."""
        path = Path(path)
        tokenizer = Tokenizer.from_dir(path)
        if tokenizer is None:
            return None
        template = ChatTemplate.from_dir(path)
        if template is None:
            family = "gemma3" if tokenizer.token_to_id("<start_of_turn>") is not None else "gemma4"
            template = ChatTemplate.default(family)
        gen_file = path / "generation_config.json"
        gen = read_json(gen_file) if gen_file.is_file() else {}
        if not isinstance(gen, dict):
            raise ValueError(f"{gen_file}: expected a JSON object")
        for field in ("eos_token_id", "suppress_tokens"):
            value = gen.get(field)
            values = value if isinstance(value, list) else [value]
            if value is not None and not all(type(i) is int and i >= 0 for i in values):
                raise ValueError(
                    f"{gen_file}: {field} is {value!r}; expected a token id (an integer >= 0) "
                    "or a list of them"
                )
        config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
        video = config.get("video_token_id") if isinstance(config, dict) else None
        return cls(tokenizer, template, gen, video if isinstance(video, int) else None)

    def check_media_input(self, config: Any, images: bool, audio: bool) -> None:
        """Raise `MediaError` when images (audio) are given to a model without that input, or when
        its placeholder id, `config.json`'s `image_token_id` (`audio_token_id`), is not what the
        tokenizer encodes `<|image|>` (`<|audio|>`) as: the prompt would then hold no placeholder
        for the model to fill."""
        for field, token, used, kind, tower in (
            ("image_token_id", media.IMAGE_TOKEN, images, "image", config.vision),
            ("audio_token_id", media.AUDIO_TOKEN, audio, "audio", config.audio),
        ):
            if not used:
                continue
            if tower is None:
                raise media.MediaError(
                    f"this model ({config.model_type}) takes no {kind} input; a Gemma 4 unified model does"
                )
            cid, tid = getattr(config, field), self.tokenizer.token_to_id(token)
            if cid != tid:
                found = f"encodes {token} as {tid}" if tid is not None else f"has no {token} token"
                raise media.MediaError(
                    f"config.json's {field} is {cid}, but the tokenizer {found}: the model's "
                    "config and tokenizer must come from the same checkpoint"
                )

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: the generation config's, else EOS, the end-of-turn token and
        (Gemma 4, as its IT config lists it) <|tool_response>, where a tool call waits for its result."""
        eos = self.generation_config.get("eos_token_id")
        if eos is None:
            tok = self.tokenizer
            ends = ("<turn|>", "<end_of_turn>", "<|tool_response>")
            eos = [tok.eos_token_id, *(tok.token_to_id(t) for t in ends)]
        ids = eos if isinstance(eos, list) else [eos]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    @property
    def suppress_token_ids(self) -> list[int]:
        """Ids never to sample (Gemma 4: the end-of-image/audio markers)."""
        return [int(i) for i in self.generation_config.get("suppress_tokens") or []]

    @property
    def supports_thinking(self) -> bool:
        """Whether the chat template has a thinking switch (Gemma 4's does, Gemma 3's not)."""
        return "enable_thinking" in self.chat_template.source

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        tools: Sequence[dict] | None = None,
    ) -> str:
        """The prompt text of a conversation (it starts with BOS: the template writes it); `tools`
        are OpenAI function schemas the model may call (see gemma_mlx.tools for its replies).

        Prompt injection: every string in `messages` and `tools` is escaped first
        (`Tokenizer.escape`), so special-token text inside a system/user/tool message, a tool
        call's arguments or a tool declaration ("<turn|>", "<|turn>system", "<|tool_call>" ...) is
        encoded as plain text, and only the template's own markup becomes control tokens. The one
        exception is an assistant message's `content`: it is the model's own output, kept as it
        was generated (the template strips its thoughts by their markup, and a session's cache
        holds those very tokens). The returned text carries the escape marks (private-use
        characters) only where data had special-token strings.

        Messages are checked first (`check_messages`); `enable_thinking` with a template that has
        no thinking switch is a ValueError rather than a silently ignored flag."""
        check_messages(messages)
        if enable_thinking and not self.supports_thinking:
            raise ValueError(f"{self.chat_template.origin}: this chat template cannot switch thinking on")
        tok = self.tokenizer
        messages = [
            {
                k: v if k == "content" and m.get("role") in ("assistant", "model") else _escaped(tok, v)
                for k, v in m.items()
            }
            if isinstance(m, Mapping)
            else m
            for m in messages
        ]
        text = self.chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            tools=_escaped(tok, tools),
            bos_token=tok.bos_token if tok.bos_token_id is not None else "",
            eos_token=tok.eos_token,
            pad_token=tok.pad_token,
        )
        self._check_media_kept(messages, text)
        return text

    def _check_media_kept(self, messages: Sequence[Mapping], text: str) -> None:
        """A template without a media input drops (Gemma 3: audio) or respells (Gemma 3:
        `<start_of_image>`) its parts; refuse that, naming the first part left without a placeholder."""
        found = [m.group() for m in media._PLACEHOLDER.finditer(text)]
        for token, kind in ((media.IMAGE_TOKEN, "image"), (media.AUDIO_TOKEN, "audio")):
            parts = [
                (i, j)
                for i, m in enumerate(messages)
                for j, p in enumerate(m.get("content") if isinstance(m.get("content"), list) else [])
                if isinstance(p, Mapping) and p.get("type") == kind
            ]
            if len(parts) > found.count(token):
                i, j = parts[found.count(token)]
                raise media.MediaError(
                    f"message {i}, part {j}: the chat template ({self.chat_template.origin}) has no "
                    f"{token} placeholder for an {kind} part, so the {kind} would be dropped: this model "
                    f"takes no {kind} input (a Gemma 4 model does)"
                )

    def encode_text(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, BOS first (once: not again when the text already starts with it).
        Gemma always wants BOS, whatever `add_bos_token` says (the IT config says false because
        its chat template writes it)."""
        ids = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_token_id
        if add_bos and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def encode_prompt(
        self,
        prompt: str | Sequence[int] | Sequence[dict],
        enable_thinking: bool = False,
        tools: Sequence[dict] | None = None,
    ) -> list[int]:
        """Token ids for plain text (BOS prepended), ready ids (as they are), or chat messages
        (rendered by the chat template, which writes BOS itself)."""
        kind, prompt = classify_prompt(prompt)
        if kind == "text":
            return self.encode_text(prompt)
        if kind == "ids":
            return prompt
        return self.tokenizer.encode(
            self.apply_chat_template(prompt, enable_thinking=enable_thinking, tools=tools)
        )

    def _encode_media_text(self, text: str, add_bos: bool) -> list[int]:
        """`encode_text`, with `<|video|>` as the video token id where the tokenizer lacks the token
        (its neighbours are always the special `<|image>` / `<image|>`, so cutting there changes
        no other token)."""
        if media.VIDEO_TOKEN not in text or self.tokenizer.token_to_id(media.VIDEO_TOKEN) is not None:
            return self.encode_text(text, add_bos)
        if self.video_token_id is None:
            raise media.MediaError(
                "this checkpoint has no <|video|> token (neither in its tokenizer nor as video_token_id "
                "in config.json)"
            )
        pieces = text.split(media.VIDEO_TOKEN)
        ids = self.encode_text(pieces[0], add_bos)
        for piece in pieces[1:]:
            ids.append(self.video_token_id)
            ids += self.tokenizer.encode(piece) if piece else []
        return ids

    def prepare(
        self,
        prompt: str | Sequence[int] | Sequence[dict],
        images: Sequence[Any] = (),
        audio: Sequence[Any] = (),
        *,
        videos: Sequence[Any] = (),
        enable_thinking: bool = False,
        max_soft_tokens: int = 280,
        video_soft_tokens: int = DEFAULT_SOFT_TOKENS,
        video_frames: int | None = DEFAULT_FRAMES,
        video_fps: float | None = None,
        add_bos: bool = True,
        tools: Sequence[dict] | None = None,
        token_budget: int | None = None,
        media_budget: media.MediaBudget | None = None,
    ) -> Inputs:
        """Token ids plus image/audio/video tensors. Media come as parts of chat messages
        (`{"type": "image", "image": path | PIL image | array}`, `{"type": "audio", "audio": path |
        array, "sampling_rate": 16000}`, `{"type": "video", "video": path | bytes | frames, "fps":
        rate of pre-sampled frames}`) or, for a text prompt with `<|image|>`/`<|audio|>`/`<|video|>`
        placeholders, as `images` / `audio` / `videos` in order (`add_bos=False` for a text that
        continues a cached conversation); a text without any placeholder gets them in front. Audio
        longer than 30 s becomes consecutive 30 s blocks. `tools` (OpenAI function schemas) go to
        the chat template.

        Videos (`gemma_mlx.video`): a file (path or bytes) or pre-sampled frames (a list of images
        or a [T, H, W, 3] array; `(frames, fps)` gives their rate, else 24 fps is assumed); sampled
        to `video_frames` frames uniformly, or `video_fps` frames per second of the clip (at most
        `video_frames`); `video_soft_tokens` per frame (70, 140, 280, 560 or 1120; images use
        `max_soft_tokens`).

        `token_budget`: the tokens the context has left; audio or a video that alone needs more is
        refused (`MediaError` with the count) as soon as its length is known (a video from its
        header, before decoding), long before a prefill of thousands of tokens could start.

        `media_budget`: what the media may cost in total (`media.MediaBudget`; its defaults when
        None), charged from every image's and audio clip's header before any of them is decoded."""
        kind, prompt = classify_prompt(prompt)
        if kind == "ids":
            if images or audio or videos:
                raise ValueError("media need a text or chat prompt with placeholders, not token ids")
            return Inputs(prompt)
        images = list(images)
        audio = [a if isinstance(a, tuple) else (a, None) for a in audio]  # (clip, sampling rate)
        videos = [_video_entry(v) for v in videos]  # (source, fps of pre-sampled frames)
        if kind == "messages":
            for i, message in enumerate(prompt):
                content = message.get("content")
                for j, part in enumerate(content if isinstance(content, list) else []):
                    if not isinstance(part, Mapping) or part.get("type") not in ("image", "audio", "video"):
                        continue
                    what = part["type"]
                    src = part.get(what, part.get("path"))
                    if src is None:
                        raise media.MediaError(
                            f"message {i}, part {j}: {'an' if what != 'video' else 'a'} {what} part without "
                            f"its {what} (give '{what}': a path, bytes or an array, or 'path')"
                        )
                    if what == "image":
                        images.append(src)
                    elif what == "audio":
                        audio.append((src, part.get("sampling_rate")))
                    else:
                        videos.append((src, part.get("fps")))
            text, bos = self.apply_chat_template(prompt, enable_thinking=enable_thinking, tools=tools), False
        else:
            text, bos = prompt, add_bos
            if not any(t in text for t in (media.IMAGE_TOKEN, media.AUDIO_TOKEN, media.VIDEO_TOKEN)):
                text = (
                    media.VIDEO_TOKEN * len(videos)
                    + media.IMAGE_TOKEN * len(images)
                    + media.AUDIO_TOKEN * len(audio)
                    + text
                )  # media first
        if not images and not audio and not videos:
            return Inputs(self.encode_text(text, bos))
        budget = media.MediaBudget() if media_budget is None else media_budget
        media.check_placeholders(text, len(images), len(audio), len(videos))  # before any decoding

        def check_room(src: Any, seconds: float, tokens: int) -> None:
            if token_budget is not None and tokens > token_budget:
                raise media.MediaError(
                    f"{media.source_name(src)}: {seconds:.1f} s of audio needs "
                    f"{tokens:,} tokens (with the clips before it), but the context has room for "
                    f"{token_budget:,}: use a shorter clip"
                )

        audio_tokens = 0
        for a, rate in audio:  # headers only: nothing is decoded before every input has been charged
            seconds = budget.add_audio(a, rate)
            audio_tokens += media.audio_token_count(math.ceil(seconds * media.SAMPLE_RATE))
            check_room(a, seconds, audio_tokens)
        for i in images:
            budget.add_image(i)
        waveforms, audio_tokens = [], 0
        for a, rate in audio:  # again with the decoded lengths: a compressed file's header may estimate
            waveforms.append(media.load_audio(a, rate))
            audio_tokens += media.audio_token_count(len(waveforms[-1]))
            check_room(a, len(waveforms[-1]) / media.SAMPLE_RATE, audio_tokens)
        video_inputs, room = [], None if token_budget is None else token_budget - audio_tokens
        for src, frames_fps in videos:
            v = preprocess_video(
                src, video_soft_tokens, video_frames, video_fps, frames_fps=frames_fps, token_budget=room
            )
            video_inputs.append(v)
            room = None if room is None else room - v.num_tokens
        clips = [[media.preprocess_audio(c) for c in media.split_audio(w)] for w in waveforms]
        image_inputs = [media.preprocess_image(i, max_soft_tokens) for i in images]
        text = media.expand_media_tokens(
            text,
            [i.num_soft_tokens for i in image_inputs],
            [[c.num_frames for c in cs] for cs in clips],
            [expand_video(v) for v in video_inputs],
        )
        out = Inputs(self._encode_media_text(text, bos))
        if image_inputs:
            out.pixel_values, out.image_position_ids, _ = media.batch_images(image_inputs)
        if clips:
            out.input_features, out.input_features_mask = media.batch_audio([c for cs in clips for c in cs])
        if video_inputs:
            out.pixel_values_videos, out.video_position_ids, out.num_frames_per_video = batch_videos(
                video_inputs
            )
            out.video_timestamps = [v.timestamps for v in video_inputs]
        return out


def _video_entry(v: Any) -> tuple[Any, float | None]:
    """A `videos` item: a source, or (pre-sampled frames, their fps)."""
    if isinstance(v, tuple) and len(v) == 2 and (v[1] is None or isinstance(v[1], int | float)):
        return v
    return v, None
