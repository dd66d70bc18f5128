"""Constrained decoding (gemma_mlx.constrain): JSON-schema answers and tool calls on random-weight tiny
models, every output validated with jsonschema; logprobs, penalties and logit_bias on logits; the
server's response_format, checked tool_choice and refused fields."""

from __future__ import annotations

import copy
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

import mlx.core as mx
from tiny import UNIFIED_CONFIG, save_checkpoint, token_ids

from gemma_mlx import load
from gemma_mlx.constrain import (
    Constraint,
    apply_mask,
    make_constraint,
    response_format_grammar,
    tool_call_grammar,
    vocabulary,
)
from gemma_mlx.generate import generate, make_cache
from gemma_mlx.sample import SamplingParams, _Penalties
from gemma_mlx.tools import parse_output

# a small text-only Gemma 4 (two layers): random weights give a spread-out distribution, so the
# masks, not the model, decide what is valid
SMALL = {
    **copy.deepcopy(UNIFIED_CONFIG["text_config"]),
    "architectures": ["Gemma4UnifiedForCausalLM"],
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "layer_types": ["sliding_attention", "full_attention"],
    "per_layer_config": {},
    "sliding_window": 8,
    "attention_k_eq_v": False,
}

# 23 schemas: nested objects, arrays with min/maxItems, enums, integer/number ranges, required and
# optional keys, anyOf/oneOf, $ref, pattern and format; strings are bounded so that a random model ends
SCHEMAS = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())
SEEDS = (0, 1, 2)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    "units": {"enum": ["c", "f"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "number", "minimum": -100, "maximum": 100},
                    "b": {"type": "integer", "minimum": 0, "maximum": 100},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
                    "opts": {"type": "object", "properties": {"exact": {"type": "boolean"}}},
                },
                "required": ["a", "b"],
            },
        },
    },
]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return load(save_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", config=SMALL, seed=3))


def test_the_table_is_a_table_of_valid_schemas():
    assert len(SCHEMAS) >= 20
    for schema in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schema_outputs_validate(small, index):
    model, processor = small
    schema = SCHEMAS[index]
    for seed in SEEDS:
        fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
        r = generate(
            model, processor, "Data:", max_tokens=300, temperature=1.0, seed=seed, response_format=fmt
        )
        assert r.finish_reason == "stop", (seed, r.text)
        jsonschema.validate(json.loads(r.text), schema)


def test_json_object_and_pydantic_model(small):
    from pydantic import BaseModel, ConfigDict, Field

    class Item(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(max_length=6)
        count: int = Field(ge=0, le=9)

    model, processor = small
    r = generate(model, processor, "x", max_tokens=300, temperature=1.0, seed=0, response_format=Item)
    assert r.finish_reason == "stop"
    Item.model_validate_json(r.text)
    r = generate(
        model, processor, "x", max_tokens=8, temperature=1.0, seed=1, response_format={"type": "json_object"}
    )
    assert r.text.startswith("{")  # cut off: finish_reason says so, the text is not claimed complete
    assert r.finish_reason == "length" or isinstance(json.loads(r.text), dict)


def test_unsupported_keywords_are_named():
    for schema, word in (
        ({"not": {"type": "string"}}, "not"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ):
        with pytest.raises(ValueError, match=word):
            response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    with pytest.raises(ValueError, match="response_format.type"):
        response_format_grammar({"type": "yaml"})
    assert response_format_grammar({"type": "text"}) is None
    flat = response_format_grammar({"type": "json_schema", "name": "x", "schema": SCHEMAS[0]})
    assert flat == response_format_grammar({"type": "json_schema", "json_schema": {"schema": SCHEMAS[0]}})


def _calls(r):
    return parse_output(r.text).tool_calls


@pytest.mark.parametrize("thinking", [False, True])
def test_required_tool_call_is_declared_and_valid(small, thinking):
    """With thinking, a bias opens and closes a thought first (a random model rarely closes one):
    the call is then forced from the first answer token."""
    model, processor = small
    tok = processor.tokenizer
    channel = [tok.token_to_id("<|channel>"), tok.token_to_id("<channel|>")]
    bias = {channel[0]: 60.0, channel[1]: 100.0} if thinking else None  # <channel|> is masked at first
    messages = [{"role": "user", "content": "weather?"}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(4):
        r = generate(
            model,
            processor,
            messages,
            tools=TOOLS,
            tool_choice="required",
            enable_thinking=thinking,
            max_tokens=120,
            temperature=1.0,
            seed=seed,
            logit_bias=bias,
        )
        calls = _calls(r)
        assert calls, (seed, r.text)
        assert calls[0].name in schemas
        jsonschema.validate(calls[0].arguments, schemas[calls[0].name])
        answer = r.tokens[2:] if thinking else r.tokens
        if thinking:
            assert r.tokens[:2] == channel
        assert answer[0] == tok.token_to_id("<|tool_call>")  # the answer starts with the call


def test_named_tool_choice_forces_that_tool(small):
    model, processor = small
    for seed in range(2):
        r = generate(
            model, processor, "go", tools=TOOLS, tool_choice="add", max_tokens=120, temperature=1.0, seed=seed
        )
        [call, *_] = _calls(r)
        assert call.name == "add"
        jsonschema.validate(call.arguments, TOOLS[1]["function"]["parameters"])


def test_no_call_without_tools_or_with_none(small):
    """A bias that makes <|tool_call> the model's first choice everywhere: "none" and no tools still
    never sample it; "auto" samples it and the call that follows is declared and valid."""
    model, processor = small
    call_open = processor.tokenizer.token_to_id("<|tool_call>")
    bias = {call_open: 100.0}
    for kwargs in ({"tools": TOOLS, "tool_choice": "none"}, {"tool_choice": "none"}):
        for seed in range(2):
            r = generate(
                model, processor, "x", max_tokens=20, temperature=1.0, seed=seed, logit_bias=bias, **kwargs
            )
            assert call_open not in r.tokens and not _calls(r)
    r = generate(
        model,
        processor,
        "x",
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=120,
        temperature=1.0,
        seed=0,
        logit_bias=bias,
    )
    assert r.tokens[0] == call_open and _calls(r)[0].name in ("get_weather", "add")


def _declared_and_valid(r, processor) -> int:
    """The number of calls in `r`; each is a declared tool's, with arguments valid against its schema,
    and every call that closed was parsed (none kept as text)."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    calls = _calls(r)
    assert len(calls) == r.tokens.count(processor.tokenizer.token_to_id("<tool_call|>")), r.text
    for call in calls:
        assert call.name in schemas, r.text
        jsonschema.validate(call.arguments, schemas[call.name])
    return len(calls)


def test_declared_tools_are_checked_by_default(small, monkeypatch):
    """Tools declared, no tool_choice: "auto". A bias makes <|tool_call> the random model's first
    choice wherever it may open, so each answer is a run of calls: every one is a declared tool's
    with valid arguments. Without llguidance the same requests are only parsed (no error): the
    same model then opens call after call and never closes one, so no call comes back."""
    model, processor = small
    call_open = processor.tokenizer.token_to_id("<|tool_call>")
    kw = {"tools": TOOLS, "max_tokens": 120, "temperature": 1.0, "logit_bias": {call_open: 100.0}}
    messages = [{"role": "user", "content": "weather?"}]
    assert make_constraint(processor, model.config.text.vocab_size, tools=TOOLS) is not None
    for seed in range(4):
        r = generate(model, processor, messages, seed=seed, **kw)
        assert r.tokens[0] == call_open
        assert _declared_and_valid(r, processor) >= 1
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if it were not installed
    assert make_constraint(processor, model.config.text.vocab_size, tools=TOOLS) is None
    with pytest.raises(ImportError, match=r"gemma-mlx\[structured\]"):
        make_constraint(processor, model.config.text.vocab_size, tools=TOOLS, tool_choice="required")
    for seed in range(4):
        r = generate(model, processor, messages, seed=seed, **kw)
        assert r.tokens[0] == call_open and not _calls(r), r.text


def test_a_tool_schema_the_grammar_cannot_enforce_is_parsed_by_default(small, caplog):
    """tool_choice omitted: the unenforceable keyword (or a malformed schema) is logged and calls
    are parsed; "auto" said explicitly: a ValueError naming the keyword (or the schema)."""
    model, processor = small
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]
    size = model.config.text.vocab_size
    with caplog.at_level("WARNING", logger="gemma_mlx.constrain"):
        assert make_constraint(processor, size, tools=tools) is None
    assert "'not'" in caplog.text
    with pytest.raises(ValueError, match="'not'"):
        make_constraint(processor, size, tools=tools, tool_choice="auto")
    malformed = {"type": "object", "properties": {"a": {"type": "string", "minLength": None}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": malformed}}]
    assert make_constraint(processor, size, tools=tools) is None
    with pytest.raises(ValueError, match=r"tools\[0\].function.parameters: not a valid JSON schema"):
        make_constraint(processor, size, tools=tools, tool_choice="auto")


@pytest.mark.parametrize("tool_choice", ["auto", None])
def test_no_call_inside_the_thought(small, tool_choice):
    model, processor = small
    tok = processor.tokenizer
    channel_open, call_open = tok.token_to_id("<|channel>"), tok.token_to_id("<|tool_call>")
    bias = {channel_open: 100.0, call_open: 50.0}
    r = generate(
        model,
        processor,
        [{"role": "user", "content": "hi"}],
        tools=TOOLS,
        tool_choice=tool_choice,
        enable_thinking=True,
        max_tokens=12,
        temperature=1.0,
        seed=0,
        logit_bias=bias,
    )
    assert r.tokens[0] == channel_open  # the thought opened, and never held a call
    assert call_open not in r.tokens


def test_constraint_phases_on_token_ids(small):
    """The masks of a response format after a thought: free (bar <|tool_call>) inside, the grammar after."""
    model, processor = small
    tok, size = processor.tokenizer, model.config.text.vocab_size
    c = make_constraint(processor, size, response_format={"type": "json_object"}, thinking=True)
    assert isinstance(c, Constraint)
    bits = lambda words: np.unpackbits(np.array(words).view(np.uint8), bitorder="little")[:size]  # noqa: E731
    first = bits(c.mask())
    assert first[tok.token_to_id("<|channel>")] and not first[tok.token_to_id("<|tool_call>")]
    c.advance(tok.token_to_id("<|channel>"))
    inside = bits(c.mask())
    assert inside.sum() == size - 1 and not inside[tok.token_to_id("<|tool_call>")]
    c.advance(tok.encode("Hm")[0])
    c.advance(tok.token_to_id("<channel|>"))
    after = bits(c.mask())
    allowed = {tok.decode([i]) for i in np.nonzero(after)[0]}
    assert allowed and all(t.startswith("{") for t in allowed)


def test_tool_grammar_accepts_what_format_arguments_writes(small):
    """The grammar reads Gemma's syntax as the template and the parser write it."""
    import llguidance

    from gemma_mlx.tools import format_arguments

    model, processor = small
    vocab = vocabulary(processor, model.config.text.vocab_size)
    grammar = tool_call_grammar(vocab, TOOLS)
    tok = processor.tokenizer
    for name, args, ok in (
        ("add", {"a": -1.5, "b": 3, "tags": ["x"], "opts": {"exact": True}}, True),
        ("get_weather", {"city": "Paris", "units": "c"}, True),
        ("get_weather", {"city": "Paris", "days": 9}, False),  # above maximum
        ("get_weather", {"days": 2}, False),  # city is required
        ("nope", {}, False),
    ):
        m = llguidance.LLMatcher(vocab.lltokenizer, grammar)
        ids = tok.encode(f"call:{name}{format_arguments(args)}<tool_call|>")
        assert all(m.consume_token(t) for t in ids) == ok, (name, args)


def test_unconstrained_paths_ignore_the_constraint_module(small):
    """Without a response format nothing is masked; with tools and no tool_choice ("auto") nothing
    is masked until a call opens: the same tokens as without tools."""
    model, processor = small
    a = generate(model, processor, "x", max_tokens=12, temperature=1.0, seed=5)
    b = generate(model, processor, "x", max_tokens=12, temperature=1.0, seed=5, tools=TOOLS)
    assert a.tokens == b.tokens


def test_apply_mask_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 70)).astype(np.float32)
    allowed = rng.random(70) < 0.3
    words = np.packbits(np.concatenate([allowed, np.zeros(26, bool)]), bitorder="little").view(np.int32)
    out = np.array(apply_mask(mx.array(logits), mx.array(words)))
    np.testing.assert_array_equal(out, np.where(allowed, logits, -np.inf))


# --- logprobs, penalties, logit_bias ---------------------------------------------------------------


def test_logprobs_are_log_softmax_of_the_logits(small):
    model, processor = small
    prompt = processor.prepare("The quick brown").ids
    r = generate(model, processor, prompt, max_tokens=6, temperature=1.0, seed=2, logprobs=3)
    assert len(r.logprobs) == len(r.tokens) == 6
    ids = mx.array([prompt + r.tokens[:-1]])
    logits = model(ids, make_cache(model)).astype(mx.float32)[0, len(prompt) - 1 :]
    ref = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    for row, lp in zip(ref, r.logprobs, strict=True):
        assert abs(row[lp.token] - lp.logprob) < 1e-5
        top = np.argsort(-row)[:3]
        assert [t for t, _ in lp.top] == top.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], row[top], atol=1e-5)


def test_penalties_as_documented():
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0)
    pen = _Penalties(params, prompt_ids=[4])
    logits = mx.array([[1.0, -1.0, 2.0, 0.5, 3.0, -2.0]])
    first = np.array(pen.apply(logits))
    # only the prompt's token 4 is penalized so far (repetition: 3 / 2)
    np.testing.assert_allclose(first, [[1.0, -1.0, 2.0, 0.5, 1.5, -2.0]])
    for t in (1, 1, 2):
        pen.count(mx.array([t]))
    out = np.array(pen.apply(logits))
    # token 1: twice, negative: -1 * 2 - 0.5 * 2 - 0.25; token 2: once: 2 / 2 - 0.5 - 0.25
    np.testing.assert_allclose(out, [[1.0, -3.25, 0.25, 0.5, 1.5, -2.0]])


def test_logit_bias_and_penalty_change_the_choice():
    logits = mx.array([[0.0, 1.0, 0.5]])
    assert SamplingParams().token_sampler()(logits).item() == 1
    assert SamplingParams(logit_bias={2: 1.0}).token_sampler()(logits).item() == 2
    sample = SamplingParams(presence_penalty=0.8).token_sampler()
    # 1 is drawn and pushed to 0.2, below 2 (0.5); then 2 drops to -0.3: 1 again (presence counts once)
    assert [sample(logits).item() for _ in range(3)] == [1, 2, 1]
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 200.0})
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0.0)


# --- the server -------------------------------------------------------------------------------------


class _Server:
    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive()
            time.sleep(0.02)

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def served(small):
    pytest.importorskip("openai")
    from gemma_mlx.server.app import create_app

    model, processor = small
    srv = _Server(create_app(model, processor, model_id="small"))
    yield srv
    srv.server.should_exit = True
    srv.thread.join(10)


def test_openai_parse_with_a_pydantic_model(served):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        city: str = Field(max_length=8)
        days: int = Field(ge=1, le=7)
        unit: Literal["c", "f"]

    client = served.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for seed in (0, 1):
        r = client.chat.completions.parse(
            model="small",
            messages=messages,
            response_format=Answer,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        assert isinstance(r.choices[0].message.parsed, Answer)
        assert r.choices[0].finish_reason == "stop"


def test_server_tool_choice_and_refusals(served):
    import openai

    client = served.client()
    messages = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(
        model="small",
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        temperature=1.0,
        seed=0,
    )
    [call, *_] = r.choices[0].message.tool_calls
    fn = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(call.function.arguments), fn[call.function.name])
    assert r.choices[0].finish_reason == "tool_calls"
    with pytest.raises(openai.BadRequestError, match="not"):
        client.chat.completions.create(
            model="small",
            messages=messages,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
        )
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="small", prompt="x", best_of=2)
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(
            model="small",
            messages=messages,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "zz"}},
        )


def test_server_checks_calls_when_tool_choice_is_omitted(served, small):
    """Tools declared, no tool_choice: every call returned is a declared tool's with valid arguments
    (a bias makes <|tool_call> the model's first choice wherever a call may open)."""
    _, processor = small
    call_open = processor.tokenizer.token_to_id("<|tool_call>")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(3):
        r = served.client().chat.completions.create(
            model="small",
            messages=[{"role": "user", "content": "weather?"}],
            tools=TOOLS,
            logit_bias={str(call_open): 100},
            max_tokens=120,
            temperature=1.0,
            seed=seed,
        )
        calls = r.choices[0].message.tool_calls
        assert calls, (seed, r.choices[0])
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_server_logprobs_and_length(served):
    client = served.client()
    r = client.chat.completions.create(
        model="small",
        messages=[{"role": "user", "content": "hi"}],
        logprobs=True,
        top_logprobs=2,
        max_tokens=4,
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=0,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert r.choices[0].finish_reason == "length"  # cut off: never claims complete JSON
    c = client.completions.create(model="small", prompt="x", logprobs=1, max_tokens=3, temperature=0)
    assert len(c.choices[0].logprobs.token_logprobs) == 3


def test_token_ids_of_the_tiny_tokenizer_are_the_markup(tmp_path):
    """The masks rely on the markup being special tokens in the tokenizer the tests use."""
    save_checkpoint(tmp_path / "t", config=SMALL, seed=0)
    ids = token_ids(tmp_path / "t")
    assert {"<|tool_call>", "<tool_call|>", '<|"|>', "<|channel>", "<channel|>"} <= set(ids)


def test_cli_json_schema(small, tmp_path):
    from typer.testing import CliRunner

    from gemma_mlx.cli.app import app

    model, processor = small
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, config=SMALL, seed=3)
    schema = SCHEMAS[9]
    (tmp_path / "s.json").write_text(json.dumps(schema))
    runner = CliRunner()
    for source in (str(tmp_path / "s.json"), json.dumps(schema)):
        args = ["generate", "--model", str(ckpt), "-n", "200", "--temperature", "1", "--seed", "1"]
        result = runner.invoke(app, [*args, "--json-schema", source, "--json", "Data:"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert out["finish_reason"] == "stop"
        jsonschema.validate(json.loads(out["text"]), schema)
    result = runner.invoke(app, ["generate", "--model", str(ckpt), "--json-schema", '{"not": {}}', "x"])
    assert result.exit_code == 1 and "not" in result.stderr and "Traceback" not in result.output


def test_langchain_with_structured_output(served):
    langchain_openai = pytest.importorskip("langchain_openai")
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Pick(BaseModel):
        model_config = ConfigDict(extra="forbid")
        color: Literal["red", "green", "blue"]
        count: int = Field(ge=0, le=9)

    llm = langchain_openai.ChatOpenAI(
        base_url=f"http://127.0.0.1:{served.port}/v1",
        api_key="x",
        model="small",
        max_tokens=100,
        temperature=1.0,
        seed=0,
        max_retries=0,
    )
    out = llm.with_structured_output(Pick, method="json_schema").invoke("Pick a color and a count.")
    assert isinstance(out, Pick)


def test_chat_session_answers_in_json_every_turn(small):
    from gemma_mlx.chat import ChatSession

    model, processor = small
    schema = SCHEMAS[7]
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    session = ChatSession(
        model,
        processor,
        max_tokens=200,
        response_format=fmt,
        sampling=SamplingParams(temperature=1.0, seed=4),
    )
    for text in ("first", "second"):
        chunks = list(session.send(text))
        assert chunks[-1].finish_reason == "stop"
        jsonschema.validate(json.loads("".join(c.text for c in chunks)), schema)
    assert session.stats.cached_prompt_tokens > 0  # the second turn continued the cache


def test_tool_grammar_patterns_refs_and_odd_keys(small):
    import llguidance

    from gemma_mlx.tools import format_arguments

    model, processor = small
    vocab = vocabulary(processor, model.config.text.vocab_size)
    kids = {"type": "array", "items": {"$ref": "#/$defs/node"}}
    node = {"type": "object", "properties": {"v": {"type": "integer"}, "kids": kids}, "required": ["v"]}
    params = {
        "type": "object",
        "$defs": {"node": node},
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"},
            "tree": {"$ref": "#/$defs/node"},
            "odd key": {"type": "boolean"},
            "free": {},
            "n": {"type": ["integer", "null"]},
        },
        "required": ["code"],
    }
    grammar = tool_call_grammar(
        vocab, [{"type": "function", "function": {"name": "f", "parameters": params}}]
    )
    full = {"code": "AB-12", "tree": {"v": 1, "kids": [{"v": 2}]}, "odd key": True, "free": {"x": [1, "s"]}}
    for args, ok in (
        ({**full, "n": None}, True),
        ({"code": "AB-1", "n": 3}, True),
        ({"code": "ab-12"}, False),
        ({"tree": {"v": 1}}, False),
    ):
        m = llguidance.LLMatcher(vocab.lltokenizer, grammar, log_level=0)
        ids = processor.tokenizer.encode(f"call:f{format_arguments(args)}<tool_call|>")
        assert all(m.consume_token(t) for t in ids) == ok, args
    with pytest.raises(ValueError, match="uniqueItems"):
        bad = {"type": "object", "properties": {"l": {"type": "array", "uniqueItems": True}}}
        tool_call_grammar(vocab, [{"type": "function", "function": {"name": "g", "parameters": bad}}])


def test_missing_engine_names_the_extra(monkeypatch):
    import sys

    from gemma_mlx.constrain import ConstraintUnavailable

    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if it were not installed
    with pytest.raises(ConstraintUnavailable, match=r"gemma-mlx\[structured\]"):
        response_format_grammar({"type": "json_object"})
