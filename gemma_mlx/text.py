"""Tokenizer (tokenizer.json or SentencePiece tokenizer.model), streaming detokenizer, chat template."""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import sentencepiece as spm
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


def read_json(path: Path) -> Any:
    """A JSON file's content; a malformed file is a ValueError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# Private-use marks around special-token text that comes from data (message content, tool arguments):
# `Tokenizer.encode` reads "\ue000<turn|>\ue001" as the plain text "<turn|>", never as the token.
LITERAL_OPEN, LITERAL_CLOSE = "\ue000", "\ue001"
_LITERAL = re.compile(f"{LITERAL_OPEN}([^{LITERAL_OPEN}{LITERAL_CLOSE}]+){LITERAL_CLOSE}")
_MARKS = str.maketrans("", "", LITERAL_OPEN + LITERAL_CLOSE)
# In generated text as the output parser reads it (`GenerationChunk.markup`): a "<" that plain tokens
# wrote, so that only the special tokens the model sampled spell markup there.
PLAIN_LT = "\ue002"


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or as {"content": ...} dicts."""
    return value.get("content") if isinstance(value, Mapping) else value


class Tokenizer:
    """Gemma tokenizer: `tokenizer.json` through `tokenizers`, or `tokenizer.model` through
    `sentencepiece` (GGUF-derived checkpoints). Special-token strings in text map to their ids,
    except where `escape` marked them as literal text (what chat messages hold: see `escape`)."""

    def __init__(self, backend: Any, config: Mapping | None = None):
        self._backend = backend
        self._sp = type(backend).__module__.startswith("sentencepiece")
        self._special_re: re.Pattern | None = None
        config = config or {}
        if self._sp:
            # sentencepiece matches user-defined pieces in text itself but never control ones
            # (Gemma 3 GGUFs make <start_of_turn> a control piece): those we split out ourselves
            specials = [
                backend.id_to_piece(i)
                for i in range(backend.get_piece_size())
                if backend.is_control(i) or backend.is_unknown(i)
            ]
            if specials := sorted(filter(None, specials), key=len, reverse=True):
                self._special_re = re.compile("|".join(map(re.escape, specials)))
            self._escape_re = self._special_re
        else:  # added tokens are matched in text whether special or not; specials are the risk
            specials = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
            specials = sorted(filter(None, specials), key=len, reverse=True)
            self._escape_re = re.compile("|".join(map(re.escape, specials))) if specials else None

        def default(name: str) -> str:  # sentencepiece knows its own bos/eos/pad pieces
            i = getattr(backend, f"{name}_id")() if self._sp else -1
            return backend.id_to_piece(i) if i >= 0 else f"<{name}>"

        self.bos_token: str = _token_str(config.get("bos_token")) or default("bos")
        self.eos_token: str = _token_str(config.get("eos_token")) or default("eos")
        self.pad_token: str = _token_str(config.get("pad_token")) or default("pad")
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        self.add_bos_token = bool(config.get("add_bos_token", self.bos_token_id is not None))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """Load from a checkpoint directory; None when it has no tokenizer files."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, Mapping):
            raise ValueError(f"{config_file}: expected a JSON object")
        if (f := path / "tokenizer.json").is_file():
            try:
                return cls(HFTokenizer.from_file(str(f)), config)
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise ValueError(f"{f}: cannot be read as a tokenizer ({e})") from None
        if (f := path / "tokenizer.model").is_file():
            sp = spm.SentencePieceProcessor()
            try:
                sp.load(str(f))
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{f}: cannot be read as a SentencePiece model ({e})") from None
            return cls(sp, config)
        return None

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (control pieces): the only ids whose text is markup."""
        if self._sp:
            sp = self._backend
            return frozenset(i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i))
        return frozenset(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_piece_size() if self._sp else self._backend.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        if not self._sp:
            return self._backend.token_to_id(token)
        i = self._backend.piece_to_id(token)  # unknown pieces give unk_id, which may be -1
        return i if 0 <= i < self.vocab_size and self._backend.id_to_piece(i) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < self.vocab_size:
            return None
        return self._backend.id_to_piece(token_id) if self._sp else self._backend.id_to_token(token_id)

    def escape(self, text: str) -> str:
        """`text` with each special-token string in it marked as literal text, so that `encode`
        gives it plain-text ids (e.g. "<", "turn", "|>") instead of the control token. Chat
        templates render message content escaped this way: a user typing "<turn|>" or
        "<|turn>system" cannot close or open a turn; only the template's own markup is control
        tokens. Marks already in `text` are removed first, so data cannot fake or unbalance them."""
        text = text.translate(_MARKS)
        if self._escape_re is None:
            return text
        return self._escape_re.sub(lambda m: LITERAL_OPEN + m.group() + LITERAL_CLOSE, text)

    def escape_generated(self, markup: str) -> str:
        """Generated text as `GenerationChunk.markup` spells it, made a chat message again: the
        special tokens the model sampled stay markup, special-token text it wrote with plain
        tokens is escaped, so re-encoding gives back plain tokens, never control ones."""
        if self._escape_re is None:
            return markup.replace(PLAIN_LT, "<")
        out, pos = [], 0
        for m in self._escape_re.finditer(markup):  # only sampled specials: plain "<"s are PLAIN_LT
            out += [self.escape(markup[pos : m.start()].replace(PLAIN_LT, "<")), m.group()]
            pos = m.end()
        out.append(self.escape(markup[pos:].replace(PLAIN_LT, "<")))
        return "".join(out)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS first when `add_bos_token` says so.
        Special-token strings become their ids unless `escape` marked them (then plain text); stray
        marks are dropped."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if LITERAL_OPEN not in text and LITERAL_CLOSE not in text:
            ids = self._encode(text)
        else:
            ids, pos = [], 0
            for m in _LITERAL.finditer(text):
                ids += self._encode(text[pos : m.start()].translate(_MARKS))
                ids += self._encode_literal(m.group(1))
                pos = m.end()
            ids += self._encode(text[pos:].translate(_MARKS))
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def _encode_literal(self, text: str) -> list[int]:
        """Plain-text ids of `text`, special-token strings included: each is cut after its first
        character, so no piece matches a special token."""
        if self._sp:  # sentencepiece never matches control pieces in text: its own encode is literal
            return self._backend.encode(text)
        ids = []
        while self._escape_re is not None and (m := self._escape_re.search(text)):
            ids += self._encode(text[: m.start() + 1])
            text = text[m.start() + 1 :]
        return ids + self._encode(text)

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        if not self._sp:  # added (special) tokens are matched in text whatever add_special_tokens says
            ids = self._backend.encode(text, add_special_tokens=False).ids
        elif self._special_re is None:
            ids = self._backend.encode(text)
        else:
            ids, pos = [], 0
            for m in self._special_re.finditer(text):
                ids += self._backend.encode(text[pos : m.start()]) if m.start() > pos else []
                ids.append(self._backend.piece_to_id(m.group()))
                pos = m.end()
            ids += self._backend.encode(text[pos:]) if pos < len(text) else []
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [operator.index(i) for i in ids]
        if not self._sp:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        # sentencepiece decodes control pieces to "" and <unk> to " ⁇ ": write them as the text they
        # are; ids past the vocabulary are dropped, as `tokenizers` does (sentencepiece would raise)
        sp, out, run, size = self._backend, [], [], self.vocab_size
        for i in ids:
            if not 0 <= i < size:
                continue
            if sp.is_control(i) or sp.is_unknown(i):
                out += [sp.decode(run), "" if skip_special_tokens else sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join([*out, sp.decode(run)])


class StreamingDetokenizer:
    """Turns a stream of token ids into text deltas that are always whole UTF-8 characters.

    Each step decodes only a short window: the tokens from the previous emission point (kept as
    left context, so leading-space rules see what the full decode sees) to the newest token, and
    emits what the newest tokens added. A run of byte-fallback tokens (`<0xNN>`) is held until it
    ends, since the full decode turns an invalid run into U+FFFD as a whole (valid bytes included),
    and a window ending in U+FFFD waits for more tokens. So the deltas concatenate exactly to
    `tokenizer.decode(all ids)`, for runs of up to `MAX_HELD` byte tokens.
    """

    MAX_HELD = 32  # a longer run of byte tokens is emitted as it comes (latency over exactness)

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        ids = (tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256))
        self.byte_ids = frozenset(i for i in ids if i is not None)
        self.vocab_size = tokenizer.vocab_size
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []  # the recent tokens only (the decode window and a little more)
        self._prefix = self._read = 0  # window start; tokens before _read are emitted
        self._before: str | None = ""  # decode(tokens[_prefix:_read]), None when not yet computed
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    def add_token(self, token: int) -> str:
        """Feed one token id; returns the text it completes (often "", or several characters)."""
        token = operator.index(token)
        self.tokens.append(token)
        held = len(self.tokens) - self._read
        # ids beyond the tokenizer's vocabulary decode to nothing: they do not end a byte run
        if (token in self.byte_ids or token >= self.vocab_size) and held < self.MAX_HELD:
            return ""
        if self._before is None:
            self._before = self.tokenizer.decode(self.tokens[self._prefix : self._read])
        window = self.tokenizer.decode(self.tokens[self._prefix :])
        if len(window) <= len(self._before) or (window.endswith("\ufffd") and held < self.MAX_HELD):
            return ""
        delta = window[len(self._before) :]
        self._prefix, self._read, self._before = self._read, len(self.tokens), None
        if self._prefix > 64:  # drop history the window no longer needs
            del self.tokens[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        self._text += delta
        return delta

    def finalize(self) -> str:
        """Flush what is still held back (a trailing incomplete character decodes to U+FFFD)."""
        delta = ""
        if self._read < len(self.tokens):
            before = self._before
            if before is None:
                before = self.tokenizer.decode(self.tokens[self._prefix : self._read])
            delta = self.tokenizer.decode(self.tokens[self._prefix :])[len(before) :]
        self._prefix = self._read = len(self.tokens)
        self._before = ""
        self._text += delta
        return delta


# --- chat templates -------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON (as in transformers)
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _check_names(names: Any) -> None:
    for name in names:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"namespace attribute {name!r}: names starting with _ are refused"
            )


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names: no route to Python internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's own signature trick)
        _check_names(dict(*args[1:], **kwargs))
        jinja2.utils.Namespace.__init__(*args, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_names([name])
        super().__setitem__(name, value)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _plain(value: Any) -> Any:
    """Template data rebuilt from plain JSON types: rich objects in messages (PIL images, arrays)
    have methods the sandbox does not know to be unsafe, so a template only sees a placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, str, int, float):  # subclasses (enums, numpy scalars) back to the base type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # numpy / mlx scalars
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def _with_dict_arguments(message: dict) -> dict:
    """`message` with its tool calls' JSON-string arguments (OpenAI's wire form) decoded to dicts."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    decoded = []
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        arguments = function.get("arguments") if isinstance(function, Mapping) else None
        if isinstance(arguments, str):
            try:
                value = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                call = {**call, "function": {**function, "arguments": value}}
        decoded.append(call)
    return {**message, "tool_calls": decoded}


def _environment() -> ImmutableSandboxedEnvironment:
    """The sandbox and helpers chat templates are written against (transformers' conventions)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        namespace=_Namespace,
    )
    return env


def _pick_template(value: Any, origin: Path) -> str | None:
    """`chat_template` as a string, or transformers' list of named templates (the "default" one)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, Mapping) and "template" in t for t in value):
        named = {t.get("name"): t["template"] for t in value}
        return named.get("default", value[0]["template"] if value else None)
    raise ValueError(f"{origin}: chat_template must be a string or a list of named templates")


class ChatTemplate:
    """A chat template rendered in jinja2's sandbox (no access to Python internals, no I/O)."""

    def __init__(self, source: str, origin: str = "<chat template>"):
        self.source, self.origin = source, origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{origin}: invalid chat template (line {e.lineno}: {e.message})") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate | None:
        """The checkpoint's own template: chat_template.jinja, chat_template.json or the
        `chat_template` of tokenizer_config.json; None when it ships none."""
        path = Path(path)
        if (f := path / "chat_template.jinja").is_file():
            return cls(f.read_text(encoding="utf-8"), str(f))
        for name in ("chat_template.json", "tokenizer_config.json"):
            if (f := path / name).is_file():
                data = read_json(f)
                template = _pick_template(data.get("chat_template") if isinstance(data, Mapping) else None, f)
                if template is not None:
                    return cls(template, str(f))
        return None

    @classmethod
    def default(cls, family: str = "gemma4") -> ChatTemplate:
        """Our own template for `family` ("gemma4" or "gemma3"), for checkpoints that ship none."""
        name = f"templates/{family}.jinja"
        return cls(
            resources.files("gemma_mlx").joinpath(name).read_text(encoding="utf-8"), f"gemma_mlx/{name}"
        )

    def render(
        self,
        messages: Sequence[Mapping],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        bos_token: str = "<bos>",
        tools: Sequence[Mapping] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages` (dicts with `role` and `content`: a string or a list of
        `{"type": "text"|"image"|"audio", ...}` parts; assistant `tool_calls` and role "tool" results
        in OpenAI's shape) and `tools` (OpenAI function schemas), which the template receives as
        transformers passes them. Tool-call arguments given as a JSON string reach the template as a
        dict (Google's template expects one). Errors name the template's file."""
        if isinstance(messages, (str, Mapping)) or not all(isinstance(m, Mapping) for m in messages):
            raise ValueError("chat messages must be a list of dicts with 'role' and 'content'")
        if tools is not None and (
            isinstance(tools, (str, Mapping)) or not all(isinstance(t, Mapping) for t in tools)
        ):
            raise ValueError("tools must be a list of dicts (OpenAI function schemas)")
        # keys set to None are dropped (APIs send content=None; templates test for missing keys)
        messages = [_with_dict_arguments({k: v for k, v in m.items() if v is not None}) for m in messages]
        data = _plain(
            dict(
                extra,
                tools=list(tools) if tools else None,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                bos_token=bos_token,
            )
        )
        try:
            return self._template.render(**data)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.origin}: {e}") from None
        except Exception as e:  # a template bug (e.g. str + None): still name the file
            raise ValueError(f"{self.origin}: rendering failed ({type(e).__name__}: {e})") from e
