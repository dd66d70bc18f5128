"""Gemma 4 tool calls and thoughts in generated text: parsing (whole or streamed) and the argument syntax.

Wire format (ai.google.dev "function calling with Gemma 4"; the official chat template):

- a call: ``<|tool_call>call:NAME{key:<|"|>text<|"|>,n:15,flag:true,list:[1,2],obj:{a:null}}<tool_call|>``;
  several calls follow each other, each in its own block (one block holding several ``call:``s is read too).
  Keys are bare (or ``<|"|>``-quoted when they hold ``:,{}[]`` or edge spaces), strings are delimited by
  the ``<|"|>`` token with no escapes inside, numbers/booleans/null are bare (``None``/``True``/``False``
  are read too: the official template writes Python's spelling of None).
- a thought: ``<|channel>thought\\n...<channel|>`` before the answer.
- the answer ends at ``<turn|>``, ``<eos>`` or ``<|tool_response>`` (the model stops there to wait for
  a tool's result); nothing after them is part of the answer.

Parsing works on text decoded with the special tokens kept. Generated text comes with a second spelling,
`GenerationChunk.markup`, in which only the special tokens the model sampled spell markup: every ``<``
written by plain tokens is `PLAIN_LT` there, so a model that repeats the *text* ``<|tool_call>call:...``
or ``<turn|>`` (say, from a prompt-injected document) produces text, never a call, a thought or an end of
the answer. Generation (`generate`, `ChatSession`, the server) parses that spelling; a plain string given
to `parse_output` is read as it stands. With `tools` (the declared function names), a call of any other
name stays text too. The visible answer (``content``) never
holds control markup: thoughts go to ``reasoning``, calls to ``tool_calls``, other special-token text
(``<bos>``, ``<|image|>``, a stray ``<|"|>`` ...) is dropped, and content/reasoning are trimmed of
surrounding whitespace. A call that is cut off (no ``<tool_call|>`` before the end) or does not parse is
not an exception: its text is returned in ``content`` with ``<|"|>`` written as ``"`` and other markup
removed (``call:f{a:"x"``), and ``malformed`` is set.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .text import PLAIN_LT

QUOTE = '<|"|>'
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
END_MARKUP = frozenset({"<turn|>", "<eos>", "<|tool_response>"})
THOUGHT = "thought\n"  # the channel's name line

# Special-token text: Gemma 4's <|name>, <name|>, <|name|> (including <|"|>) and the classic specials.
# Names are bounded so that any markup fits the held-back window below.
_MARKUP = re.compile(r'<\|[\w"]{1,32}\|?>|<\w{1,32}\|>|<(?:bos|eos|pad|mask)>')
# A tail that more text could still complete into markup ("<", "<|tool_", "<channel", "<|\"|").
_PARTIAL = re.compile(r'<(?:\|[\w"]{0,32}\|?|\w{0,32}\|?)')
_MAX_MARKUP = 40  # longer "<..." tails are text, never held back

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_BARE = re.compile(r"[^,\]}\s]+")  # a bare scalar runs to the next separator
_BARE_KEY = re.compile(r"[^:,{}\[\]]+")
_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_CALL_HEAD = re.compile(r"call:([^{}\s]+)\s*")


@dataclass
class ToolCall:
    name: str
    arguments: dict  # JSON-compatible
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class ParsedOutput:
    content: str  # the visible answer, no control markup ever
    reasoning: str | None  # the thought channel's text, None when there is none (or it is empty)
    tool_calls: list[ToolCall]
    malformed: bool = False  # a call was cut off or invalid: its text is in `content`


@dataclass
class Delta:
    kind: str  # "content" | "reasoning" | "tool_call"
    text: str = ""
    tool_call: ToolCall | None = None


# --- argument syntax -------------------------------------------------------------------------------


def _key_needs_quotes(key: str) -> bool:
    return not key or key != key.strip() or any(c in key for c in ":,{}[]")


def format_arguments(value: Any) -> str:
    """A JSON-compatible value in Gemma's argument syntax (a dict gives ``{key:value,...}``, keys in
    their order). Strings holding the ``<|"|>`` delimiter, non-string keys and non-finite floats
    cannot be written and raise ValueError."""
    if isinstance(value, str):
        if QUOTE in value:
            raise ValueError(f"string {value!r} contains the {QUOTE} delimiter and cannot be written")
        return QUOTE + value + QUOTE
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a JSON number")
        return repr(float(value))
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"object key {key!r} is not a string")
            items.append(
                (format_arguments(key) if _key_needs_quotes(key) else key) + ":" + format_arguments(item)
            )
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_arguments(v) for v in value) + "]"
    raise ValueError(f"{type(value).__name__} value {value!r} is not JSON-compatible")


class _Reader:
    """Recursive-descent reader of the argument syntax over one string."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, what: str) -> None:
        near = self.text[self.pos : self.pos + 20]
        raise ValueError(f"{what} at position {self.pos} (near {near!r})" if near else f"{what} at the end")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def expect(self, char: str) -> None:
        self.skip_space()
        if not self.text.startswith(char, self.pos):
            self.fail(f"expected {char!r}")
        self.pos += len(char)

    def string(self) -> str:
        start = self.pos + len(QUOTE)
        end = self.text.find(QUOTE, start)
        if end < 0:
            self.fail("unterminated string")
        self.pos = end + len(QUOTE)
        return self.text[start:end]

    def value(self) -> Any:
        self.skip_space()
        if self.text.startswith(QUOTE, self.pos):
            return self.string()
        char = self.text[self.pos : self.pos + 1]
        if char == "{":
            return self.object()
        if char == "[":
            return self.array()
        m = _BARE.match(self.text, self.pos)
        if m is None:
            self.fail("expected a value")
        word = m.group()
        if word in _LITERALS:
            self.pos = m.end()
            return _LITERALS[word]
        number = _NUMBER.fullmatch(word)
        if number is None:
            self.fail('expected a value (a <|"|>string<|"|>, number, true, false, null, {...} or [...])')
        value = float(word) if number.group(1) or number.group(2) else int(word)
        if isinstance(value, float) and not math.isfinite(value):
            self.fail("number out of range")
        self.pos = m.end()
        return value

    def key(self) -> str:
        self.skip_space()
        if self.text.startswith(QUOTE, self.pos):
            return self.string()
        m = _BARE_KEY.match(self.text, self.pos)
        if m is None or not m.group().strip():
            self.fail("expected a key")
        self.pos = m.end()
        return m.group().strip()

    def object(self) -> dict:
        self.expect("{")
        out: dict = {}
        self.skip_space()
        if self.text.startswith("}", self.pos):
            self.pos += 1
            return out
        while True:
            key = self.key()
            self.expect(":")
            out[key] = self.value()
            self.skip_space()
            if self.text.startswith("}", self.pos):
                self.pos += 1
                return out
            self.expect(",")

    def array(self) -> list:
        self.expect("[")
        out: list = []
        self.skip_space()
        if self.text.startswith("]", self.pos):
            self.pos += 1
            return out
        while True:
            out.append(self.value())
            self.skip_space()
            if self.text.startswith("]", self.pos):
                self.pos += 1
                return out
            self.expect(",")

    def at_end(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)


def parse_arguments(text: str) -> dict:
    """The dict written as ``{key:value,...}`` in Gemma's argument syntax (the inverse of
    `format_arguments` on dicts). Bad input raises ValueError naming the position."""
    reader = _Reader(text)
    out = reader.object()
    if not reader.at_end():
        reader.fail("unexpected text after the object")
    return out


def _parse_calls(body: str) -> list[ToolCall]:
    """The calls inside one ``<|tool_call>...<tool_call|>`` block: ``call:NAME{...}``, once or more."""
    reader, calls = _Reader(body), []
    while not calls or not reader.at_end():
        reader.skip_space()
        m = _CALL_HEAD.match(body, reader.pos)
        if m is None:
            reader.fail("expected call:NAME{...}")
        reader.pos = m.end()
        calls.append(ToolCall(m.group(1), reader.object()))
    return calls


# --- output parsing ---------------------------------------------------------------------------------


def _partial_start(text: str) -> int:
    """Where a trailing, still incomplete piece of markup starts (len(text) when there is none)."""
    i = text.rfind("<", max(0, len(text) - _MAX_MARKUP))
    return i if i >= 0 and _PARTIAL.fullmatch(text, i) else len(text)


class OutputParser:
    """Streaming parser: feed text deltas of one answer as they are decoded, get typed deltas back.

    Markup split across deltas is held back until it is complete, so no control markup ever reaches
    content; whitespace around content and reasoning is held back too, which makes the concatenated
    content/reasoning deltas equal `parse_output`'s fields whatever the chunking. `thinking` says
    the prompt asked for thoughts; Gemma 4's generation prompt never leaves the thought channel open
    (the model opens it itself), so the text is read the same way either way.
    """

    def __init__(self, thinking: bool = False, tools: Iterable[str] | None = None):
        self.thinking = thinking
        self.tools = None if tools is None else frozenset(tools)  # None: any name is a call
        self._buffer = ""
        self._state = "content"  # | "reasoning" | "call" | "done"
        self._channel_name: str | None = None  # text after <|channel> until the name line is settled
        self._call = ""
        self._started = {"content": False, "reasoning": False}
        self._space = {"content": "", "reasoning": ""}  # trailing whitespace not yet emitted
        self._held = {"content": "", "reasoning": ""}  # text that may complete markup `_tail` began
        self._tail = {"content": "", "reasoning": ""}  # the end of what was emitted
        self._out: list[Delta] = []
        self._malformed = False

    @property
    def malformed(self) -> bool:
        return self._malformed

    def feed(self, text: str) -> list[Delta]:
        self._buffer += text
        self._consume(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        """Flush what was held back; a call still open becomes content and sets `malformed`."""
        self._consume(final=True)
        if self._state == "reasoning":
            self._settle_channel_name(final=True)
        elif self._state == "call":
            self._give_up_call()
        self._state = "done"
        for kind in self._held:
            self._emit(kind, "", final=True)
        return self._take()

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        for d in out:
            d.text = d.text.replace(PLAIN_LT, "<")
            if d.tool_call is not None:
                d.tool_call.name = _plain(d.tool_call.name)
                d.tool_call.arguments = _plain(d.tool_call.arguments)
        return out

    def _consume(self, final: bool) -> None:
        while self._buffer:
            m = _MARKUP.search(self._buffer)
            if m is None:
                cut = len(self._buffer) if final else _partial_start(self._buffer)
                text, self._buffer = self._buffer[:cut], self._buffer[cut:]
                self._text(text)
                return
            text, self._buffer = self._buffer[: m.start()], self._buffer[m.end() :]
            self._text(text)
            self._markup(m.group())

    def _text(self, text: str) -> None:
        if not text or self._state == "done":
            return
        if self._state == "call":
            self._call += text
        elif self._state == "reasoning" and self._channel_name is not None:
            self._channel_name += text
            self._settle_channel_name(final=False)
        else:
            self._emit(self._state, text)

    def _markup(self, token: str) -> None:
        state = self._state
        if state == "done":
            return
        if state == "call":
            if token == CALL_CLOSE:
                self._close_call()
            elif token in END_MARKUP:
                self._give_up_call()
                self._state = "done"
            else:  # <|"|> and anything else belong to the call's text
                self._call += token
            return
        if state == "reasoning" and token in END_MARKUP | {CHANNEL_CLOSE, CALL_OPEN}:
            self._settle_channel_name(final=True)
        if token in END_MARKUP:
            self._state = "done"
        elif token == CHANNEL_OPEN:
            self._state, self._channel_name = "reasoning", ""
        elif token == CHANNEL_CLOSE:
            self._state = "content"
        elif token == CALL_OPEN:
            self._state, self._call = "call", ""
        # any other special-token text is dropped

    def _settle_channel_name(self, final: bool) -> None:
        """Drop the channel's "thought\\n" name line once it is certain; other text is reasoning."""
        name = self._channel_name
        if name is None:
            return
        if THOUGHT.startswith(name) and not final:
            return  # could still become the name line
        self._channel_name = None
        if name.startswith(THOUGHT):
            name = name[len(THOUGHT) :]
        elif name == THOUGHT.rstrip("\n"):
            name = ""
        self._emit("reasoning", name)

    def _close_call(self) -> None:
        try:
            calls = _parse_calls(self._call)
        except ValueError:
            self._give_up_call()
            return
        if self.tools is not None and any(_plain(c.name) not in self.tools for c in calls):
            self._give_up_call(malformed=False)  # a call of an undeclared function stays text
            return
        self._out += [Delta("tool_call", tool_call=call) for call in calls]
        self._state = "content"

    def _give_up_call(self, malformed: bool = True) -> None:
        self._malformed |= malformed
        text = self._call.replace(QUOTE, '"')
        while _MARKUP.search(text):  # removing one piece of markup may join another
            text = _MARKUP.sub("", text)
        self._state = "content"
        self._emit("content", text)

    def _emit(self, kind: str, text: str, final: bool = False) -> None:
        """Emit visible text, trimmed. Text that dropped markup or a thought left next to the end of
        what was emitted ("<|tu" + "rn>") must not form markup there: what would complete it is
        dropped, and what still might is held (decided by the text alone, not by its chunking)."""
        held = self._held[kind] + text
        while held and not self._space[kind]:
            tail = self._tail[kind]
            start = _partial_start(tail)
            if start == len(tail):
                break
            probe = tail[start:] + held
            m = _MARKUP.match(probe)
            if m:
                held = probe[m.end() :]
            elif _PARTIAL.fullmatch(probe) and not final:
                self._held[kind] = held
                return
            else:
                break
        self._held[kind] = ""
        if not self._started[kind]:
            held = held.lstrip()
        body = held.rstrip()
        if not body:
            self._space[kind] += held
            return
        out = self._space[kind] + body
        self._out.append(Delta(kind, out))
        self._started[kind] = True
        self._space[kind] = held[len(body) :]
        self._tail[kind] = (self._tail[kind] + out)[-_MAX_MARKUP:]


def _plain(value: Any) -> Any:
    """`value` (a str, or JSON data) with `PLAIN_LT` written as "<" again."""
    if isinstance(value, str):
        return value.replace(PLAIN_LT, "<")
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def tool_names(tools: Iterable[Any]) -> list[str]:
    """The function names of OpenAI tool schemas (``{"type": "function", "function": {"name": ...}}``,
    or the bare function object)."""
    names = []
    for t in tools:
        f = t.get("function", t) if isinstance(t, Mapping) else None
        if isinstance(f, Mapping) and isinstance(f.get("name"), str):
            names.append(f["name"])
    return names


def parse_output(text: str, tools: Iterable[str] | None = None) -> ParsedOutput:
    """Split the whole generated text of one answer into content, reasoning and tool calls (only
    of functions in `tools`, when given). Give it `GenerationResult.markup` (or the chunks'
    `markup`) for generated text: see the module doc."""
    parser = OutputParser(tools=tools)
    deltas = parser.feed(text) + parser.finish()
    return ParsedOutput(
        content="".join(d.text for d in deltas if d.kind == "content"),
        reasoning="".join(d.text for d in deltas if d.kind == "reasoning") or None,
        tool_calls=[d.tool_call for d in deltas if d.tool_call is not None],
        malformed=parser.malformed,
    )
