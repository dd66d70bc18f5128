"""Constrained decoding: JSON-schema answers and grammar-checked tool calls, as token masks.

The engine is llguidance (see README "Structured outputs" for why, measured against xgrammar in
benchmarks/constrain_engines.py). One `Constraint` per request: the generation loop asks it for a
packed bitmask (int32 words, bit i = token i allowed) before sampling each token and tells it
the token sampled; the mask is applied in MLX (`apply_mask`), so the logits never come back to
the host. The host computes the mask for step t+1 while the device runs step t+1's forward pass.

Phases of one answer: an optional thought (`<|channel>...<channel|>`, free text: no mask but
`<|tool_call>`), then the answer, where a response format's grammar holds from the first token,
or, with tools, free text in which each `<|tool_call>` opens a call that the grammar of
`call:NAME{arguments}<tool_call|>` then holds until it closes (tool_choice "required" or a named
tool: the answer must start with a call; "none" or no tools: `<|tool_call>` is never allowed).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from .text import Tokenizer

EXTRA = "structured"
_log = logging.getLogger(__name__)
_warned: set[str] = set()
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ConstraintUnavailable(ImportError):
    """The `structured` extra (llguidance) is not installed."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ConstraintUnavailable(
            f"structured outputs and constrained tool calls need llguidance: pip install 'gemma-mlx[{EXTRA}]'"
        ) from None
    return llguidance


def available() -> bool:
    """Whether the engine (the `structured` extra) is installed."""
    try:
        _llguidance()
    except ConstraintUnavailable:
        return False
    return True


def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], list[int]]:
    """Every token's bytes as decoding writes them (▁ is a space, <0xNN> byte-fallback pieces are
    that byte) and the ids of the special tokens (control markup, which no plain text spells)."""
    backend = tokenizer._backend
    tokens: list[bytes] = []
    special: list[int] = []
    if tokenizer._sp:
        for i in range(backend.get_piece_size()):
            piece = backend.id_to_piece(i)
            if backend.is_control(i) or backend.is_unknown(i):
                special.append(i)
                tokens.append(piece.encode())
            elif backend.is_byte(i):
                tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                tokens.append(piece.replace("\u2581", " ").encode())
        return tokens, special
    added = {i: t for i, t in backend.get_added_tokens_decoder().items()}
    for i in range(backend.get_vocab_size()):
        piece = backend.id_to_token(i)
        if piece is None:
            tokens.append(b"")
            continue
        if i in added:
            if added[i].special:
                special.append(i)
            tokens.append(piece.encode())
        elif m := _BYTE.fullmatch(piece):
            tokens.append(bytes([int(m.group(1), 16)]))
        else:
            tokens.append(piece.replace("\u2581", " ").encode())
    return tokens, special


class Vocabulary:
    """llguidance's view of one tokenizer, padded to the model's `size` (ids past the tokenizer
    are never allowed). Built once per (tokenizer, size): about a second for 262,144 tokens."""

    def __init__(self, tokenizer: Tokenizer, size: int, eos_ids: Sequence[int]):
        llg = _llguidance()
        if not eos_ids:
            raise ValueError(
                "response_format: the model has no end-of-sequence token (generation_config.json "
                "eos_token_id), so a constrained answer could never end"
            )
        tokens, special = token_bytes(tokenizer)
        self.tokenizer, self.size, self.eos_ids = tokenizer, max(size, len(tokens)), list(eos_ids)
        tokens = tokens + [b""] * (self.size - len(tokens))  # the model's padding ids: never allowed
        self.special_ids = set(special)

        class Wrapper:
            eos_token_id, bos_token_id = self.eos_ids[0], tokenizer.bos_token_id
            special_token_ids = special

            def __init__(self) -> None:
                self.tokens = tokens

            def __call__(self, text: str | bytes) -> list[int]:  # plain text: specials stay text
                text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
                return tokenizer.encode(tokenizer.escape(text))

        self.lltokenizer = llg.LLTokenizer(
            llg.TokenizerWrapper(Wrapper()), n_vocab=self.size, eos_token=self.eos_ids
        )
        self.words = (self.size + 31) // 32

    def id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def vocabulary(processor: Any, size: int | None = None) -> Vocabulary:
    """The (cached) `Vocabulary` of a processor's tokenizer for a model of `size` tokens."""
    tokenizer = processor.tokenizer
    size = size or tokenizer.vocab_size
    with _lock:
        per = _vocabularies.setdefault(tokenizer, {})
        if size not in per:
            per[size] = Vocabulary(tokenizer, size, processor.eos_token_ids)
        return per[size]


# --- grammars ---------------------------------------------------------------------------------------

ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
     "writeOnly", "format", "strict", "additionalProperties", "$defs", "definitions", "nullable"}
)  # fmt: skip


def _check_grammar(grammar: str, where: str) -> str:
    error = _llguidance().LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"{where}: the schema cannot be enforced: {error.splitlines()[0]}")
    return grammar


def json_schema_grammar(schema: Mapping, where: str = "schema") -> str:
    """llguidance's grammar of JSON text valid against `schema` (compact JSON, no whitespace
    between tokens). A keyword the engine cannot enforce is a ValueError naming it."""
    if not isinstance(schema, Mapping):
        raise ValueError(f"{where}: expected a JSON schema object, got {type(schema).__name__}")
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(
            dict(schema), defaults={"whitespace_flexible": False}
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return _check_grammar(grammar, where)


def response_format_grammar(response_format: Any) -> str | None:
    """Compile a response format to a grammar (None: free text), or raise ValueError naming the
    field or schema keyword. Accepts OpenAI's `{"type": "text" | "json_object" | "json_schema",
    "json_schema": {"name", "schema", "strict"}}`, the flat `{"type": "json_schema", "schema"}` of
    the Responses and Anthropic APIs, a bare JSON schema, or a Pydantic model class."""
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        return json_schema_grammar(response_format.model_json_schema(), "response_format")
    if not isinstance(response_format, Mapping):
        raise ValueError(f"response_format: expected an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, "response_format")
    if kind == "json_schema" and "json_schema" not in response_format and "schema" in response_format:
        # the Responses API's `text.format` and Anthropic's `output_config.format` are flat
        return json_schema_grammar(response_format["schema"] or {}, "response_format.schema")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise ValueError("response_format.json_schema: expected {name, schema, strict}")
        return json_schema_grammar(spec.get("schema") or {}, "response_format.json_schema.schema")
    if kind in (None, "object", "array", "string", "number", "integer", "boolean", "null") or isinstance(
        kind, list
    ):
        return json_schema_grammar(response_format, "response_format")
    raise ValueError(f"response_format.type: {kind!r} is not one of text, json_object, json_schema")


# what the tool-argument grammar enforces (besides the annotations, which change nothing)
_TOOL_KEYWORDS = frozenset(
    "type properties required items minItems maxItems enum const anyOf oneOf $ref minimum maximum "
    "exclusiveMinimum exclusiveMaximum minLength maxLength pattern".split()
)


class _Lark:
    """Builds a Lark grammar (llguidance's dialect) for tool-call arguments in Gemma's syntax."""

    def __init__(self, quote: int, root: Mapping):
        self.quote, self.root = f"<[{quote}]>", root
        self.rules: dict[str, str] = {}
        self.refs: dict[str, str] = {}

    def rule(self, body: str) -> str:
        for name, b in self.rules.items():
            if b == body:
                return name
        name = f"r{len(self.rules)}"
        self.rules[name] = body
        return name

    def literal(self, value: Any) -> str:
        from .tools import format_arguments

        text = format_arguments(value)
        return " ".join(
            self.quote if part == QUOTE else json.dumps(part)
            for part in re.split(f"({re.escape(QUOTE)})", text)
            if part
        )

    def string(self, schema: Mapping) -> str:
        q = self.quote
        if "pattern" in schema:  # JSON schema patterns are unanchored unless they say so
            pattern = str(schema["pattern"])
            body = pattern[1:] if pattern.startswith("^") else "(?s:.)*" + pattern
            ends = body.endswith("$") and not body.endswith("\\$")
            body = body[:-1] if ends else body + "(?s:.)*"
            return self.rule(f"{q} /{body.replace('/', chr(92) + '/')}/ {q}")
        lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
        if not lo and hi is None:
            return self.rule(f"{q} STR? {q}")
        if hi is not None and int(hi) == 0:
            return self.rule(f"{q} {q}")
        inner = f"/(?s:.){{{max(lo, 1)},{'' if hi is None else int(hi)}}}/"
        return self.rule(f"{q} {inner} {q}" if lo else f"{q} {inner}? {q}")

    def value(self, schema: Any, where: str) -> str:
        if schema is True or schema == {}:
            return "any"
        if not isinstance(schema, Mapping):
            raise ValueError(f"{where}: expected a JSON schema object")
        for key in schema:
            if key not in _TOOL_KEYWORDS and key not in ANNOTATIONS:
                raise ValueError(f"{where}: the keyword {key!r} cannot be enforced in tool arguments")
        if "$ref" in schema:
            ref = schema["$ref"]
            m = re.fullmatch(r"#/(\$defs|definitions)/(.+)", ref) if isinstance(ref, str) else None
            if m is None or m.group(2) not in self.root.get(m.group(1), {}):
                raise ValueError(f"{where}.$ref: {ref!r} is not a local definition (#/$defs/NAME)")
            if ref not in self.refs:
                self.refs[ref] = name = f"d{len(self.refs)}"
                self.rules[name] = "any"  # placeholder while recursing
                self.rules[name] = self.value(self.root[m.group(1)][m.group(2)], f"{where}.$ref")
            return self.refs[ref]
        if "const" in schema:
            return self.rule(self.literal(schema["const"]))
        if "enum" in schema:
            return self.rule(" | ".join(self.literal(v) for v in schema["enum"]))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                rest = {k: v for k, v in schema.items() if k != key}
                alts = [
                    self.value({**rest, **s} if isinstance(s, Mapping) else s, f"{where}.{key}[{i}]")
                    for i, s in enumerate(schema[key])
                ]
                return self.rule(" | ".join(alts))
        kind = schema.get("type")
        if isinstance(kind, list):
            return self.rule(" | ".join(self.value({**schema, "type": k}, where) for k in kind))
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else None
        if kind is None:
            return "any"
        if kind in ("integer", "number"):
            sub = {k: v for k, v in schema.items() if k in _NUMERIC}
            return self.rule(f"%json {json.dumps(sub)}")
        if kind == "boolean":
            return self.rule('"true" | "false"')
        if kind == "null":
            return self.rule('"null"')
        if kind == "string":
            return self.string(schema)
        if kind == "array":
            item = self.value(schema.get("items", {}), f"{where}.items")
            lo, hi = int(schema.get("minItems", 0)), schema.get("maxItems")
            if hi is not None and int(hi) == 0:
                return self.rule('"[" "]"')
            more = f'("," {item}){{{max(lo - 1, 0)},{"" if hi is None else int(hi) - 1}}}'
            body = f'"[" {item} {more} "]"'
            return self.rule(body if lo > 0 else f'{body} | "[" "]"')
        if kind == "object":
            return self.object(schema, where)
        raise ValueError(f"{where}.type: {kind!r} is not a JSON schema type")

    def object(self, schema: Mapping, where: str) -> str:
        props = schema.get("properties")
        if not props:
            return "anyobj"
        required = set(schema.get("required", []))
        missing = required - set(props)
        if missing:
            raise ValueError(f"{where}.required: {sorted(missing)} are not among the properties")
        from .tools import _key_needs_quotes

        items = []
        for key, sub in props.items():
            k = self.literal(key) if _key_needs_quotes(key) else json.dumps(key)
            items.append((f'{k} ":" {self.value(sub, f"{where}.properties.{key}")}', key in required))
        # the properties in declared order, optional ones skippable: rest(i, first) in rule form
        memo: dict[tuple[int, bool], str] = {}

        def rest(i: int, first: bool) -> str:
            if i == len(items):
                return ""
            if (i, first) in memo:
                return memo[(i, first)]
            item, req = items[i]
            sep = "" if first else '"," '
            take = f"{sep}{item} {rest(i + 1, False)}".strip()
            body = (
                take if req else (f"({take}) | {rest(i + 1, first)}" if rest(i + 1, first) else f"({take})?")
            )
            memo[(i, first)] = name = self.rule(body) if body.strip() else ""
            return name

        inner = rest(0, True)
        return self.rule(f'"{{" {inner} "}}"' if inner else '"{" "}"')

    def text(self, start: str) -> str:
        q = self.quote
        generic = [
            f'any: anyobj | "[" (any ("," any)*)? "]" | {q} STR? {q} | "true" | "false" | "null" | NUM',
            'anyobj: "{" (key ":" any ("," key ":" any)*)? "}"',
            f"key: /[^:,{{}}\\[\\]\\x00<]+/ | {q} STR {q}",
            'NUM: /-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?/',
            "STR: /(?s:.)+/",
        ]  # fmt: skip
        return "\n".join([f"start: {start}", *(f"{n}: {b}" for n, b in self.rules.items()), *generic]) + "\n"


QUOTE = '<|"|>'
_NUMERIC = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"


def _tool_function(tool: Mapping, i: int) -> tuple[str, Mapping]:
    fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name', 'parameters'}}}}")
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return fn["name"], params


def tool_call_grammar(
    vocab: Vocabulary, tools: Sequence[Mapping], name: str | None = None, opened: bool = True
) -> str:
    """The grammar of one call in Gemma's syntax: `call:NAME{arguments}<tool_call|>` with NAME one
    of `tools` (or `name`) and arguments that satisfy its parameters' schema; `opened=False`
    starts with the `<|tool_call>` token itself."""
    ids = {t: vocab.id(t) for t in (QUOTE, CALL_OPEN, CALL_CLOSE)}
    if None in ids.values():
        raise ValueError('this tokenizer has no tool-call tokens (<|tool_call>, <tool_call|>, <|"|>)')
    alts = []
    lark = None
    for i, tool in enumerate(tools):
        fn, params = _tool_function(tool, i)
        if name is not None and fn != name:
            continue
        lark = _Lark(ids[QUOTE], params) if lark is None else lark
        lark.root = params
        where = f"tools[{i}].function.parameters"
        try:
            args = lark.value({"type": "object", **params}, where)
        except (TypeError, AttributeError) as e:  # a malformed schema (a list where an object goes...)
            raise ValueError(f"{where}: not a valid JSON schema ({e})") from None
        alts.append(f"{json.dumps(fn)} {args}")
    if not alts:
        raise ValueError(f"tool_choice: {name!r} is not one of the tools" if name else "tools: none declared")
    head = "" if opened else f"<[{ids[CALL_OPEN]}]> "
    grammar = _llguidance().LLMatcher.grammar_from_lark(
        lark.text(f'{head}"call:" ({" | ".join(alts)}) <[{ids[CALL_CLOSE]}]>')
    )
    error = _llguidance().LLMatcher.validate_grammar(grammar, vocab.lltokenizer)
    if error:
        raise ValueError(f"tools: the parameters cannot be enforced: {error.splitlines()[0]}")
    return grammar


# --- the per-request constraint -------------------------------------------------------------------


class Constraint:
    """One answer's token masks (see the module's docstring for the phases).

    `answer`: a grammar the whole answer must match (a response format), or None (free text);
    `call`: the grammar of a call after `<|tool_call>`, or None; `require_call`: a grammar the
    answer starts with (a call that begins with `<|tool_call>` itself); `allow_calls`: whether
    `<|tool_call>` may be sampled in free text; `thinking`: the prompt asked for a thought, which
    may open at the first token and is free text (never a call)."""

    def __init__(
        self,
        vocab: Vocabulary | _Plain,
        *,
        answer: str | None = None,
        call: str | None = None,
        require_call: str | None = None,
        allow_calls: bool = True,
        thinking: bool = False,
    ):
        self.vocab = vocab
        self.answer, self.call = answer, call
        self.allow_calls = allow_calls and call is not None
        self.ids = {t: vocab.id(t) for t in (CHANNEL_OPEN, CHANNEL_CLOSE, CALL_OPEN, CALL_CLOSE)}
        self._buffer = np.zeros(vocab.words, np.int32)
        self._ban = None if self.ids[CALL_OPEN] is None else self._words(self.ids[CALL_OPEN], allow=False)
        start = answer if answer is not None else require_call
        self._matcher = None if start is None else self._matcher_for(start)
        thinking = thinking and self.ids[CHANNEL_OPEN] is not None
        self.phase = "start" if thinking else self._answer_phase()
        # no grammar anywhere: the constraint is only "never <|tool_call>" (`banned`, if it exists)
        self.grammarless = start is None and call is None
        self.banned = self.ids[CALL_OPEN] if self.grammarless else None

    def _words(self, token: int, allow: bool) -> mx.array:
        words = np.full(self.vocab.words, 0 if allow else 0xFFFFFFFF, np.uint32)
        bit = np.uint32(1 << (token % 32))
        words[token // 32] = words[token // 32] | bit if allow else words[token // 32] & ~bit
        return mx.array(words.view(np.int32))

    def _matcher_for(self, grammar: str) -> Any:
        matcher = _llguidance().LLMatcher(self.vocab.lltokenizer, grammar)
        if matcher.is_error():
            raise ValueError(f"grammar: {matcher.get_error()}")
        return matcher

    def _answer_phase(self) -> str:
        return "free" if self._matcher is None else "grammar"

    def advance(self, token: int) -> None:
        """The token sampled under the last mask."""
        if self.phase == "start":  # a thought may open here, else the answer has begun
            if token == self.ids[CHANNEL_OPEN]:
                self.phase = "thought"
                return
            self.phase = self._answer_phase()
        phase = self.phase
        if phase == "thought":
            if token == self.ids[CHANNEL_CLOSE]:
                self.phase = self._answer_phase()
        elif phase == "free":
            if token == self.ids[CALL_OPEN] and self.call is not None:
                self.phase, self._matcher = "grammar", self._matcher_for(self.call)
        elif phase == "grammar":
            matcher = self._matcher
            if token in self.vocab.eos_ids and matcher.is_accepting():
                self.phase = "done"  # the answer ended where the grammar allows it
                return
            if not matcher.consume_token(token):
                raise RuntimeError(f"the sampled token {token} broke the grammar: {matcher.get_error()}")
            if matcher.is_stopped() and self.answer is None and token == self.ids[CALL_CLOSE]:
                self.phase, self._matcher = "free", None  # a call closed: free text again

    @property
    def steady(self) -> bool:
        """Whether the mask stays what `mask()` gives until the phase changes (free text or a
        thought: nothing, or only `<|tool_call>`, forbidden), so that several tokens can be drawn
        under it at once (a speculative round), up to the first that changes the phase."""
        return not (self.phase == "grammar" or (self.phase == "start" and self._matcher is not None))

    def mask(self) -> mx.array | None:
        """The packed mask of the next token (int32 words, bit i = token i allowed), None: any."""
        phase = self.phase
        if phase == "start":
            if self._matcher is None:
                return None if self.allow_calls else self._ban
            words = self._grammar_words()
            t = self.ids[CHANNEL_OPEN]
            words[t // 32] |= np.uint32(1 << (t % 32)).view(np.int32)
            return mx.array(words)
        if phase == "thought" or (phase == "free" and not self.allow_calls):
            return self._ban
        if phase == "grammar":
            return mx.array(self._grammar_words())
        return None

    def _grammar_words(self) -> np.ndarray:
        self._matcher.unsafe_compute_mask_ptr(self._buffer.ctypes.data, self._buffer.nbytes)
        return self._buffer


class _Plain:
    """What a constraint without grammars needs of the vocabulary (no llguidance)."""

    def __init__(self, tokenizer: Tokenizer, size: int):
        self.tokenizer, self.words = tokenizer, (max(size, tokenizer.vocab_size) + 31) // 32

    def id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


_SHIFTS = mx.array(np.arange(32, dtype=np.int32))  # data, not a lazy op: usable from any thread


def unpack_mask(words: mx.array, size: int) -> mx.array:
    """bool [size] from packed int32 words (bit i of word w = token 32 w + i)."""
    bits = mx.right_shift(words[:, None], _SHIFTS) & 1
    return bits.reshape(-1)[:size].astype(mx.bool_)


def apply_mask(logits: mx.array, words: mx.array) -> mx.array:
    """`logits [..., V]` with the tokens the mask forbids at -inf, in MLX (no host round trip)."""
    return mx.where(unpack_mask(words, logits.shape[-1]), logits, float("-inf"))


def make_constraint(
    processor: Any,
    size: int,
    *,
    response_format: Any = None,
    tools: Sequence[Mapping] | None = None,
    tool_choice: Any = None,
    thinking: bool = False,
) -> Constraint | None:
    """The constraint of one request, None when there is nothing to enforce. `tool_choice`:
    "auto" (calls are checked), "required", a tool's name or `{"type": "function", "function":
    {"name"}}` (the answer starts with a call), "none" (no call can open; also what an explicit
    tool_choice without tools means), None: "auto" when tools are declared, except that without
    the `structured` extra, or with a tool schema the grammar cannot enforce (logged), calls are
    only parsed (the tolerant parser, declared names only) instead of raising."""
    answer = response_format_grammar(response_format) if response_format is not None else None
    if isinstance(tool_choice, Mapping):
        tool_choice = (tool_choice.get("function") or {}).get("name")
    if tool_choice is None and tools and answer is None and available():
        try:
            return make_constraint(processor, size, tools=tools, tool_choice="auto", thinking=thinking)
        except ValueError as e:
            if str(e) not in _warned:  # once per schema problem, not at every turn of a chat
                _warned.add(str(e))
                _log.warning("tool calls are parsed, not grammar-checked: %s", e)
            return None
    if tool_choice is None and answer is None:
        return None
    if tool_choice not in (None, "none", "auto", "required") and not isinstance(tool_choice, str):
        raise ValueError(f"tool_choice: {tool_choice!r} is not none, auto, required or a tool's name")
    if not tools or tool_choice in (None, "none") or answer is not None:
        if tool_choice not in (None, "none", "auto") and not tools:
            raise ValueError("tool_choice: names a tool but no tools were given")
        vocab = vocabulary(processor, size) if answer is not None else _Plain(processor.tokenizer, size)
        return Constraint(vocab, answer=answer, allow_calls=False, thinking=thinking)
    vocab = vocabulary(processor, size)
    call = tool_call_grammar(vocab, tools)
    required = None
    if tool_choice == "required":
        required = tool_call_grammar(vocab, tools, opened=False)
    elif tool_choice != "auto":
        required = tool_call_grammar(vocab, tools, name=tool_choice, opened=False)
    return Constraint(vocab, call=call, require_call=required, thinking=thinking)
