"""Tokenizer (tokenizer.json or SentencePiece tokenizer.model), streaming detokenizer, chat template."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or as {"content": ...} dicts."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Gemma tokenizer: `tokenizer.json` through `tokenizers`, or `tokenizer.model` through
    `sentencepiece` (GGUF-derived checkpoints). Special-token strings in text map to their ids."""

    def __init__(self, backend: Any, config: dict | None = None):
        self._backend = backend
        self._sp = not hasattr(backend, "encode_batch")  # sentencepiece vs tokenizers
        config = config or {}
        if self._sp:  # sentencepiece matches user-defined pieces itself, but never control ones
            specials = [
                backend.id_to_piece(i)
                for i in range(backend.get_piece_size())
                if backend.is_control(i) or backend.is_unknown(i)
            ]
            self._special_re = re.compile(
                "|".join(map(re.escape, sorted(filter(None, specials), key=len, reverse=True)))
            )

        def piece(name: str) -> str:  # sentencepiece knows its own bos/eos/pad pieces
            i = getattr(backend, f"{name}_id")() if self._sp else -1
            return backend.id_to_piece(i) if i >= 0 else f"<{name}>"

        self.bos_token = _token_str(config.get("bos_token")) or piece("bos")
        self.eos_token = _token_str(config.get("eos_token")) or piece("eos")
        self.pad_token = _token_str(config.get("pad_token")) or piece("pad")
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        self.add_bos_token = bool(config.get("add_bos_token", self.bos_token_id is not None))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """Load from a checkpoint directory; None when it has no tokenizer files."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                return cls(HFTokenizer.from_file(str(path / "tokenizer.json")), config)
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise ValueError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
        if (path / "tokenizer.model").is_file():
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor()
            try:
                sp.load(str(path / "tokenizer.model"))
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{path / 'tokenizer.model'}: cannot be read ({e})") from None
            return cls(sp, config)
        return None

    @property
    def vocab_size(self) -> int:
        return self._backend.get_piece_size() if self._sp else self._backend.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        if self._sp:
            i = self._backend.piece_to_id(token)
            return None if i == self._backend.unk_id() and token != self._backend.id_to_piece(i) else i
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < self.vocab_size:
            return None
        return self._backend.id_to_piece(token_id) if self._sp else self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS first when the tokenizer wants it."""
        if self._sp:
            ids: list[int] = []
            pos = 0
            for m in self._special_re.finditer(text):
                ids += self._backend.encode(text[pos : m.start()]) if m.start() > pos else []
                ids.append(self._backend.piece_to_id(m.group()))
                pos = m.end()
            ids += self._backend.encode(text[pos:]) if pos < len(text) else []
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self._sp:  # sentencepiece decodes control pieces to nothing: write them out ourselves
            sp, out, run = self._backend, [], []
            for i in ids:
                if sp.is_control(i):
                    out += [sp.decode(run), "" if skip_special_tokens else sp.id_to_piece(i)]
                    run = []
                else:
                    run.append(i)
            return "".join([*out, sp.decode(run)])
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)


class StreamingDetokenizer:
    """Turns a stream of token ids into text deltas that are always whole UTF-8 characters.

    Decodes only a short window: the tokens since the last emitted boundary (`prefix`) plus the new
    ones, and emits what the window added; a window ending in U+FFFD (a character split across
    byte-fallback tokens) waits for more tokens. The deltas concatenate to `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self._prefix = self._read = 0
        self.text = ""

    def add_token(self, token: int) -> str:
        self.tokens.append(int(token))
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix : self._read])
        after = decode(self.tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        if self._prefix > 64:  # drop history the window no longer needs
            self.tokens = self.tokens[self._prefix :]
            self._read -= self._prefix
            self._prefix = 0
        self.text += delta
        return delta

    def finalize(self) -> str:
        """Flush what is still held back (a trailing incomplete character decodes to U+FFFD)."""
        before = self.tokenizer.decode(self.tokens[self._prefix : self._read])
        after = self.tokenizer.decode(self.tokens[self._prefix :])
        delta = after[len(before) :]
        self._prefix = self._read = len(self.tokens)
        self.text += delta
        return delta


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class ChatTemplate:
    """A chat template rendered in jinja2's sandbox (no access to Python internals)."""

    def __init__(self, source: str, origin: str = "<chat template>"):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        self.source, self.origin = source, origin
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{origin}: invalid chat template (line {e.lineno}: {e.message})") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate | None:
        """The checkpoint's own template: chat_template.jinja, chat_template.json or tokenizer_config.json."""
        path = Path(path)
        if (f := path / "chat_template.jinja").is_file():
            return cls(f.read_text(), str(f))
        for name in ("chat_template.json", "tokenizer_config.json"):
            if (f := path / name).is_file():
                template = json.loads(f.read_text()).get("chat_template")
                if isinstance(template, str):
                    return cls(template, str(f))
        return None

    @classmethod
    def default(cls, family: str = "gemma4") -> ChatTemplate:
        """Our own template for `family` ("gemma4" or "gemma3"), for checkpoints that ship none."""
        source = resources.files("gemma_mlx").joinpath(f"templates/{family}.jinja").read_text()
        return cls(source, f"gemma_mlx/templates/{family}.jinja")

    def render(
        self,
        messages: Sequence[dict],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        bos_token: str = "<bos>",
        **extra: Any,
    ) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                bos_token=bos_token,
                **extra,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.origin}: {e}") from None
