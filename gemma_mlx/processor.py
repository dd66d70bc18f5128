"""The processor: tokenizer, chat template and generation settings of one checkpoint."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import media
from .text import ChatTemplate, Tokenizer


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
        """Load from a checkpoint directory; None when it has no tokenizer files."""
        path = Path(path)
        tokenizer = Tokenizer.from_dir(path)
        if tokenizer is None:
            return None
        template = ChatTemplate.from_dir(path)
        if template is None:  # pick our own template by the turn markers the vocabulary has
            family = "gemma3" if tokenizer.token_to_id("<start_of_turn>") is not None else "gemma4"
            template = ChatTemplate.default(family)
        gen_file = path / "generation_config.json"
        try:
            gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{gen_file}: not valid JSON ({e})") from None
        return cls(tokenizer, template, gen)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: the generation config's, else EOS and end-of-turn."""
        eos = self.generation_config.get("eos_token_id")
        if eos is not None:
            return list(eos) if isinstance(eos, list) else [eos]
        ids = [
            self.tokenizer.eos_token_id,
            self.tokenizer.token_to_id("<turn|>"),
            self.tokenizer.token_to_id("<end_of_turn>"),
        ]
        return [i for i in ids if i is not None]

    @property
    def suppress_token_ids(self) -> list[int]:
        return list(self.generation_config.get("suppress_tokens") or [])

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = True, enable_thinking: bool = False
    ) -> str:
        return self.chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            bos_token=self.tokenizer.bos_token,
        )

    def encode_prompt(
        self, prompt: str | Sequence[int] | Sequence[dict], enable_thinking: bool = False
    ) -> list[int]:
        """Token ids for plain text (BOS prepended), ready ids, or chat messages (the template
        writes BOS itself)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        prompt = list(prompt)
        if all(isinstance(p, dict) for p in prompt) and prompt:
            text = self.apply_chat_template(prompt, enable_thinking=enable_thinking)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if all(isinstance(p, int) or hasattr(p, "__index__") for p in prompt):
            return [int(p) for p in prompt]
        raise ValueError("prompt must be a string, a list of token ids, or a list of chat message dicts")

    def prepare(
        self,
        prompt: str | Sequence[int] | Sequence[dict],
        images: Sequence[Any] = (),
        audio: Sequence[Any] = (),
        *,
        enable_thinking: bool = False,
        max_soft_tokens: int = 280,
        add_bos: bool = True,
    ) -> Inputs:
        """Token ids plus image/audio tensors. Media come as parts of chat messages
        (`{"type": "image", "image": path | PIL image | array}`, `{"type": "audio", "audio": path |
        array, "sampling_rate": 16000}`) or, for a text prompt with `<|image|>`/`<|audio|>`
        placeholders, as `images` / `audio` in order (`add_bos=False` for a text that continues a
        cached conversation). Audio longer than 30 s becomes consecutive 30 s blocks."""
        images, audio = list(images), list(audio)
        if not isinstance(prompt, str) and prompt and all(isinstance(m, dict) for m in prompt):
            for message in prompt:
                content = message.get("content")
                for part in content if isinstance(content, list) else []:
                    if part.get("type") == "image":
                        images.append(part.get("image", part.get("path")))
                    elif part.get("type") == "audio":
                        audio.append((part.get("audio", part.get("path")), part.get("sampling_rate")))
            text = self.apply_chat_template(prompt, enable_thinking=enable_thinking)
            bos = False
        elif isinstance(prompt, str):
            text, bos = prompt, add_bos
            audio = [(a, None) if not isinstance(a, tuple) else a for a in audio]
        else:
            if images or audio:
                raise ValueError("media need a text or chat prompt with placeholders, not token ids")
            return Inputs(self.encode_prompt(prompt))
        if not images and not audio:
            return Inputs(self.tokenizer.encode(text, add_special_tokens=bos))
        image_inputs = [media.preprocess_image(i, max_soft_tokens) for i in images]
        clips = [
            [media.preprocess_audio(c) for c in media.split_audio(media.load_audio(a, rate))]
            for a, rate in audio
        ]
        text = media.expand_media_tokens(
            text, [i.num_soft_tokens for i in image_inputs], [[c.num_frames for c in cs] for cs in clips]
        )
        out = Inputs(self.tokenizer.encode(text, add_special_tokens=bos))
        if image_inputs:
            out.pixel_values, out.image_position_ids, _ = media.batch_images(image_inputs)
        if clips:
            out.input_features, out.input_features_mask = media.batch_audio([c for cs in clips for c in cs])
        return out
