"""Random request bodies against every endpoint (Chat Completions, Completions, Responses, Messages):
random JSON types at every known field, random nesting, random unicode with lone surrogates. Only
2xx or 4xx may come back, each within a time bound, and the server answers a normal request
afterwards."""

from __future__ import annotations

import json
import time

import pytest
from tiny import rewrite_config, save_checkpoint

hypothesis = pytest.importorskip("hypothesis")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_server_hardening import Server  # noqa: E402

from gemma_mlx import load  # noqa: E402
from gemma_mlx.server import create_app  # noqa: E402

MODEL = "tiny-gemma"
SECONDS = 30  # per request: a whole answer of the tiny model (at most its 512-token context) included

SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
TEXT = st.text(st.characters() | SURROGATES, max_size=40)
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)


def field(plausible):
    """A known field: a plausible value, or any JSON value."""
    return st.one_of(plausible, JSON)


def likely(plausible):
    """A field most requests get right: mostly a plausible value, sometimes any JSON value."""
    return st.one_of(plausible, plausible, plausible, JSON)


def obj(fields: dict, required: dict | None = None):
    """A dict with `required` and some of `fields` (each drawn from its strategy), and maybe unknown keys."""
    return st.fixed_dictionaries(required or {}, optional=fields).flatmap(
        lambda d: st.dictionaries(TEXT, JSON, max_size=2).map(lambda extra: {**extra, **d})
    )


DATA_URI = st.sampled_from(
    ["data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,@@", "/etc/passwd", "~/x"]
)
PART = obj(
    {
        "type": field(st.sampled_from(["text", "image_url", "input_audio", "video"])),
        "text": field(TEXT),
        "image_url": field(obj({"url": field(DATA_URI), "detail": field(st.sampled_from(["auto", "low"]))})),
        "input_audio": field(obj({"data": field(st.sampled_from(["UklGRg==", "AAAA", ""])), "format": JSON})),
    }
)
TOOL = obj(
    {
        "type": field(st.just("function")),
        "function": field(
            obj(
                {
                    "name": field(st.sampled_from(["f", "get_weather", ""])),
                    "description": JSON,
                    "parameters": JSON,
                }
            )
        ),
    }
)
MESSAGE = obj(
    {
        "name": field(TEXT),
        "tool_calls": field(
            st.lists(
                obj({"id": JSON, "type": JSON, "function": obj({"name": TEXT, "arguments": TEXT})}),
                max_size=2,
            )
        ),
        "tool_call_id": field(TEXT),
    },
    {
        "role": likely(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
        "content": likely(TEXT | st.lists(PART, max_size=3)),
    },
)
COMMON = {
    "max_tokens": field(st.integers(-2, 40)),
    "temperature": field(st.floats(-1, 3)),
    "top_p": field(st.floats(-1, 2)),
    "top_k": field(st.integers(-1, 100)),
    "min_p": field(st.floats(-1, 2)),
    "seed": field(st.integers()),
    "stop": field(TEXT | st.lists(TEXT, max_size=5)),
    "n": field(st.integers(0, 3)),
    "stream": field(st.booleans()),
    "stream_options": field(obj({"include_usage": field(st.booleans())})),
}
CHAT = obj(
    {
        **COMMON,
        "max_completion_tokens": field(st.integers(-2, 40)),
        "tools": field(st.lists(TOOL, max_size=2)),
        "tool_choice": field(
            st.sampled_from(["auto", "none", "required"])
            | obj({"type": JSON, "function": obj({"name": TEXT})})
        ),
        "parallel_tool_calls": field(st.booleans()),
        "reasoning_effort": field(st.sampled_from(["none", "low", "high"])),
        "chat_template_kwargs": field(obj({"enable_thinking": JSON})),
    },
    {"model": likely(st.just(MODEL)), "messages": likely(st.lists(MESSAGE, min_size=1, max_size=3))},
)
COMPLETION = obj(
    {
        **COMMON,
        "echo": JSON,
        "suffix": JSON,
    },
    {
        "model": likely(st.just(MODEL)),
        "prompt": likely(TEXT | st.lists(st.integers(-5, 600), max_size=8) | st.lists(TEXT, max_size=2)),
    },
)


# Mostly valid bodies with one field (at the top or in a message) replaced by any JSON value: these
# get past validation and reach templates, media decoding, the tokenizer and generation.
VALID_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user"]),
        "content": TEXT.filter(str.strip) | st.lists(PART, max_size=2),
    }
)
VALID_CHAT = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "messages": st.lists(VALID_MESSAGE, min_size=1, max_size=2).map(
            lambda ms: [*ms, {"role": "user", "content": "Hi"}]
        ),
    },
    optional={
        "max_tokens": st.integers(1, 20),
        "temperature": st.floats(0, 2),
        "top_k": st.integers(0, 50),
        "stop": st.lists(TEXT.filter(bool), max_size=2),
        "stream": st.booleans(),
        "tools": st.lists(TOOL, max_size=1),
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "chat_template_kwargs": st.fixed_dictionaries({"enable_thinking": st.booleans()}),
    },
)


def one_field_replaced(bodies, keys):
    return st.tuples(bodies, st.sampled_from(keys), JSON).map(lambda t: {**t[0], t[1]: t[2]})


def one_message_field_replaced(bodies):
    keys = ["role", "content", "name", "tool_calls", "tool_call_id"]

    def swap(t):
        body, key, value = t
        return {**body, "messages": [{**body["messages"][0], key: value}, *body["messages"][1:]]}

    return st.tuples(bodies, st.sampled_from(keys), JSON).map(swap)


MUTATED_CHAT = (
    VALID_CHAT
    | one_field_replaced(
        VALID_CHAT, [*COMMON, "tools", "tool_choice", "chat_template_kwargs", "reasoning_effort"]
    )
    | one_message_field_replaced(VALID_CHAT)
)
VALID_COMPLETION = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "prompt": TEXT.filter(bool) | st.lists(st.integers(0, 400), min_size=1, max_size=8),
    },
    optional={"max_tokens": st.integers(1, 20), "stream": st.booleans(), "stop": TEXT.filter(bool)},
)
MUTATED_COMPLETION = VALID_COMPLETION | one_field_replaced(
    VALID_COMPLETION, [*COMMON, "prompt", "echo", "suffix"]
)

# The Responses API: input items (messages with typed parts, calls, results, reasoning), tools
# (functions, namespaces, hosted), reasoning, text.format, previous_response_id.
INPUT_PART = obj(
    {
        "type": field(
            st.sampled_from(["input_text", "output_text", "input_image", "input_audio", "refusal"])
        ),
        "text": field(TEXT),
        "image_url": field(DATA_URI),
        "input_audio": field(obj({"data": field(st.sampled_from(["UklGRg==", "AAAA", ""])), "format": JSON})),
    }
)
ITEM = obj(
    {
        "type": field(st.sampled_from(["message", "function_call", "function_call_output", "reasoning"])),
        "role": likely(st.sampled_from(["system", "developer", "user", "assistant"])),
        "content": likely(TEXT | st.lists(INPUT_PART, max_size=3)),
        "call_id": field(st.sampled_from(["c1", "c2", ""])),
        "name": field(st.sampled_from(["f", "get_weather", ""])),
        "arguments": field(st.sampled_from(["{}", '{"a": 1}', "{", ""])),
        "output": field(TEXT),
        "summary": JSON,
    }
)
RESPONSE_TOOL = obj(
    {
        "type": field(st.sampled_from(["function", "namespace", "web_search"])),
        "name": field(st.sampled_from(["f", "get_weather", "ns", ""])),
        "parameters": JSON,
        "tools": field(st.lists(obj({"type": field(st.just("function")), "name": field(TEXT)}), max_size=2)),
    }
)
RESPONSES = obj(
    {
        "instructions": field(TEXT),
        "tools": field(st.lists(RESPONSE_TOOL, max_size=2)),
        "tool_choice": field(
            st.sampled_from(["auto", "none", "required"]) | obj({"type": JSON, "name": TEXT})
        ),
        "parallel_tool_calls": field(st.booleans()),
        "max_output_tokens": field(st.integers(-2, 20)),
        "temperature": field(st.floats(-1, 3)),
        "top_p": field(st.floats(-1, 2)),
        "reasoning": field(obj({"effort": field(st.sampled_from(["none", "low", "high"]))})),
        "text": field(obj({"format": field(obj({"type": field(st.sampled_from(["text", "json_object"]))}))})),
        "previous_response_id": field(TEXT),
        "store": field(st.booleans()),
        "stream": field(st.booleans()),
    },
    {"model": likely(st.just(MODEL)), "input": likely(TEXT | st.lists(ITEM, max_size=3))},
)
VALID_RESPONSES = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "input": TEXT.filter(str.strip)
        | st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": TEXT}), min_size=1, max_size=2),
    },
    optional={
        "max_output_tokens": st.integers(1, 12),
        "stream": st.booleans(),
        "instructions": TEXT,
        "reasoning": st.fixed_dictionaries({"effort": st.sampled_from(["none", "high"])}),
    },
)
MUTATED_RESPONSES = VALID_RESPONSES | one_field_replaced(
    VALID_RESPONSES,
    ["input", "instructions", "tools", "tool_choice", "max_output_tokens", "reasoning", "text"],
)

# The Messages API: content blocks (text, image, tool_use, tool_result, thinking), system, tools,
# tool_choice, thinking, stop_sequences.
BLOCK = obj(
    {
        "type": field(st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking", "document"])),
        "text": field(TEXT),
        "source": field(
            obj(
                {
                    "type": field(st.sampled_from(["base64", "url"])),
                    "media_type": field(st.just("image/png")),
                    "data": field(st.sampled_from(["iVBORw0KGgo=", "@@", ""])),
                    "url": field(DATA_URI),
                }
            )
        ),
        "id": field(st.sampled_from(["t1", ""])),
        "tool_use_id": field(st.sampled_from(["t1", "t2"])),
        "name": field(st.sampled_from(["f", ""])),
        "input": JSON,
        "content": field(TEXT),
        "thinking": field(TEXT),
    }
)
MESSAGES = obj(
    {
        "system": field(TEXT),
        "tools": field(st.lists(obj({"name": field(TEXT), "input_schema": JSON, "type": JSON}), max_size=2)),
        "tool_choice": field(
            obj({"type": field(st.sampled_from(["auto", "any", "tool", "none"])), "name": TEXT})
        ),
        "thinking": field(
            obj({"type": field(st.sampled_from(["enabled", "disabled"])), "budget_tokens": JSON})
        ),
        "stop_sequences": field(st.lists(TEXT, max_size=3)),
        "temperature": field(st.floats(-1, 2)),
        "top_k": field(st.integers(-1, 50)),
        "stream": field(st.booleans()),
    },
    {
        "model": likely(st.just(MODEL)),
        "max_tokens": likely(st.integers(-1, 12)),
        "messages": likely(
            st.lists(
                obj(
                    {},
                    {
                        "role": likely(st.sampled_from(["user", "assistant"])),
                        "content": likely(TEXT | st.lists(BLOCK, max_size=3)),
                    },
                ),
                min_size=1,
                max_size=3,
            )
        ),
    },
)
VALID_MESSAGES = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "max_tokens": st.integers(1, 12),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.just("user"), "content": TEXT.filter(str.strip)}),
            min_size=1,
            max_size=2,
        ),
    },
    optional={
        "stream": st.booleans(),
        "system": TEXT,
        "stop_sequences": st.lists(TEXT.filter(bool), max_size=2),
    },
)
MUTATED_MESSAGES = VALID_MESSAGES | one_field_replaced(
    VALID_MESSAGES, ["messages", "system", "tools", "tool_choice", "thinking", "stop_sequences", "max_tokens"]
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = save_checkpoint(tmp_path_factory.mktemp("fuzz") / "ckpt")
    rewrite_config(out, lambda c: c["text_config"].update(max_position_embeddings=512))
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": []}))  # known lengths
    model, processor = load(out)
    srv = Server(create_app(model, processor, model_id=MODEL, default_max_tokens=8))
    yield srv
    srv.close()


def send(server, method, path, body=None):
    tic = time.perf_counter()
    content = None if body is None else json.dumps(body).encode()  # lone surrogates as \ud800 escapes
    headers = {"Content-Type": "application/json"}
    r = httpx.request(method, server.url + path, content=content, headers=headers, timeout=SECONDS)
    took = time.perf_counter() - tic
    assert r.status_code < 500, (path, r.status_code, r.text[:300])
    assert 200 <= r.status_code, (path, r.status_code)
    assert "server_error" not in r.text and "api_error" not in r.text, r.text[
        :300
    ]  # a stream's in-band error
    assert took < SECONDS
    return r


FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=MUTATED_CHAT | CHAT | JSON)
def test_chat_completions(server, body):
    send(server, "POST", "/v1/chat/completions", body)


@FUZZ
@given(body=MUTATED_COMPLETION | COMPLETION | JSON)
def test_completions(server, body):
    send(server, "POST", "/v1/completions", body)


@FUZZ
@given(body=MUTATED_RESPONSES | RESPONSES | JSON)
def test_responses(server, body):
    send(server, "POST", "/v1/responses", body)


@FUZZ
@given(body=MUTATED_MESSAGES | MESSAGES | JSON)
def test_messages(server, body):
    send(server, "POST", "/v1/messages", body)


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(name=TEXT.filter(lambda t: "\x00" not in t), method=st.sampled_from(["GET", "POST"]))
def test_models_and_health(server, name, method):
    from urllib.parse import quote

    path = quote(name.encode("utf-8", "surrogatepass"), safe="")
    for p in ("/v1/models", f"/v1/models/{path}", "/health", f"/{path}"):
        body = {"x": name} if method == "POST" else None
        r = httpx.request(
            method,
            server.url + p,
            content=body and json.dumps(body),
            timeout=SECONDS,
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code < 500, (p, r.status_code, r.text[:200])


def test_a_normal_request_works_after_the_fuzzing(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    r = send(server, "POST", "/v1/chat/completions", body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
