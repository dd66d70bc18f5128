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


@dataclass
class Inputs:
    """A prompt ready for the model: token ids and, when it has media, the reference's tensors."""

    ids: list[int]
    pixel_values: np.ndarray | None = None  # [n, max_soft_tokens, 6912]
    image_position_ids: np.ndarray | None = None  # [n, max_soft_tokens, 2]
    input_features: np.ndarray | None = None  # [m, frames, 640]
    input_features_mask: np.ndarray | None = None  # [m, frames]

    @property
    def has_media(self) -> bool:
        return self.pixel_values is not None or self.input_features is not None

    def model_kwargs(self) -> dict:
        return {k: mx.array(v) for k, v in vars(self).items() if k != "ids" and v is not None}


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
PART_TYPES = ("text", "image", "audio")


def check_messages(messages: Sequence[Any]) -> None:
    """Raise ValueError naming the message (and part) that a chat template would render wrongly or
    as an empty turn: not a dict, an unknown role, content that is neither a string nor a list of
    parts, a part of an unsupported type (video input is not supported) or a text part without text."""
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
                    + (" (video input is not supported)" if kind == "video" else "")
                )
            if kind == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"message {i}, part {j}: a text part needs 'text' (a string)")


class Processor:
    """Turns prompts (text, token ids, chat messages) into token ids for one checkpoint."""

    def __init__(
        self, tokenizer: Tokenizer, chat_template: ChatTemplate, generation_config: dict | None = None
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.generation_config = generation_config or {}

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
        return cls(tokenizer, template, gen)

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

    def prepare(
        self,
        prompt: str | Sequence[int] | Sequence[dict],
        images: Sequence[Any] = (),
        audio: Sequence[Any] = (),
        *,
        enable_thinking: bool = False,
        max_soft_tokens: int = 280,
        add_bos: bool = True,
        tools: Sequence[dict] | None = None,
        token_budget: int | None = None,
        media_budget: media.MediaBudget | None = None,
    ) -> Inputs:
        """Token ids plus image/audio tensors. Media come as parts of chat messages
        (`{"type": "image", "image": path | PIL image | array}`, `{"type": "audio", "audio": path |
        array, "sampling_rate": 16000}`) or, for a text prompt with `<|image|>`/`<|audio|>`
        placeholders, as `images` / `audio` in order (`add_bos=False` for a text that continues a
        cached conversation); a text without any placeholder gets them in front. Audio longer than
        30 s becomes consecutive 30 s blocks. `tools` (OpenAI function schemas) go to the chat
        template.

        `token_budget`: the tokens the context has left; audio that alone needs more is refused
        (`MediaError` with the count) as soon as it is decoded, before any other media work and
        long before a prefill of thousands of tokens could start.

        `media_budget`: what the media may cost in total (`media.MediaBudget`; its defaults when
        None), charged from every input's header before any of them is decoded."""
        kind, prompt = classify_prompt(prompt)
        if kind == "ids":
            if images or audio:
                raise ValueError("media need a text or chat prompt with placeholders, not token ids")
            return Inputs(prompt)
        images = list(images)
        audio = [a if isinstance(a, tuple) else (a, None) for a in audio]  # (clip, sampling rate)
        if kind == "messages":
            for i, message in enumerate(prompt):
                content = message.get("content")
                for j, part in enumerate(content if isinstance(content, list) else []):
                    if not isinstance(part, Mapping) or part.get("type") not in ("image", "audio"):
                        continue
                    what = part["type"]
                    src = part.get(what, part.get("path"))
                    if src is None:
                        raise media.MediaError(
                            f"message {i}, part {j}: an {what} part without its {what} "
                            f"(give '{what}': a path, bytes or an array, or 'path')"
                        )
                    if what == "image":
                        images.append(src)
                    else:
                        audio.append((src, part.get("sampling_rate")))
            text, bos = self.apply_chat_template(prompt, enable_thinking=enable_thinking, tools=tools), False
        else:
            text, bos = prompt, add_bos
            if media.IMAGE_TOKEN not in text and media.AUDIO_TOKEN not in text:  # media first
                text = media.IMAGE_TOKEN * len(images) + media.AUDIO_TOKEN * len(audio) + text
        if not images and not audio:
            return Inputs(self.encode_text(text, bos))
        budget = media.MediaBudget() if media_budget is None else media_budget

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
        clips = [[media.preprocess_audio(c) for c in media.split_audio(w)] for w in waveforms]
        image_inputs = [media.preprocess_image(i, max_soft_tokens) for i in images]
        text = media.expand_media_tokens(
            text, [i.num_soft_tokens for i in image_inputs], [[c.num_frames for c in cs] for cs in clips]
        )
        out = Inputs(self.encode_text(text, bos))
        if image_inputs:
            out.pixel_values, out.image_position_ids, _ = media.batch_images(image_inputs)
        if clips:
            out.input_features, out.input_features_mask = media.batch_audio([c for cs in clips for c in cs])
        return out
