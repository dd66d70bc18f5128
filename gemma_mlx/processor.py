"""The processor: tokenizer, chat template and generation settings of one checkpoint."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .text import ChatTemplate, Tokenizer


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
