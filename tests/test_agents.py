"""The Responses and Anthropic Messages APIs, driven over loopback with the official `openai`,
`anthropic` and `openai-agents` clients. Every streamed event is also validated against the SDKs'
own typed event unions, so an event they could not parse fails the test."""

from __future__ import annotations

import asyncio
import json

import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx = pytest.importorskip("httpx")

from openai.types.responses import ResponseStreamEvent  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402
from test_server import KEY, Server, png_uri, wav_b64  # noqa: E402
from tiny import save_checkpoint  # noqa: E402

from gemma_mlx import load  # noqa: E402
from gemma_mlx.server import create_app  # noqa: E402
from gemma_mlx.server.options import constraints_available  # noqa: E402
from gemma_mlx.server.responses import ResponseStore  # noqa: E402

MODEL = "tiny-gemma"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    out = save_checkpoint(tmp_path_factory.mktemp("agents") / "ckpt")
    gen = json.loads((out / "generation_config.json").read_text())
    # no end-of-sequence id: every answer runs to its token limit, so lengths are known
    (out / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": []}))
    return load(out)


@pytest.fixture(scope="module")
def server(loaded):
    model, processor = loaded
    srv = Server(
        create_app(model, processor, model_id=MODEL, api_key=KEY, model_aliases=["claude-sonnet-4-5"])
    )
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """The tool model: calls get_weather, and after the tool's result answers "Sunny." and stops."""
    from tool_model import build_tool_model

    path = tmp_path_factory.mktemp("tool_model")
    build_tool_model(path, answer="Sunny.")
    model, processor = load(path)
    srv = Server(create_app(model, processor, model_id="tool-model", any_model=True))
    yield srv, processor
    srv.close()


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    """Thinking on: a thought ("Hmm.") and then the answer ("Sunny."); off: the answer only."""
    import tool_model

    path = tmp_path_factory.mktemp("thinking_model")
    pieces = ["<|channel>", "thought\nHmm.", "<channel|>", "Sunny."]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tool_model, "PIECES", pieces)
        mp.setattr(tool_model, "STOP", "<turn|>")
        tool_model.build_tool_model(path)
    model, processor = load(path)
    srv = Server(create_app(model, processor, model_id="thinking-model"))
    yield srv
    srv.close()


def claude(srv, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=key, max_retries=0)


def sse_events(srv, path, body, headers=None) -> list[dict]:
    """The raw events of a streamed request, as JSON."""
    h = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    r = httpx.post(srv.url + path, json={**body, "stream": True}, headers=h, timeout=60)
    assert r.status_code == 200, r.text
    out = []
    for block in r.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            event = json.loads(lines["data"])
            assert lines.get("event") == event["type"]
            out.append(event)
    return out


RESPONSE_EVENT = TypeAdapter(ResponseStreamEvent)


def check_response_events(events: list[dict]) -> None:
    """Strictly typed by the SDK's models, numbered 0..n-1, created first and one terminal event last."""
    for e in events:
        RESPONSE_EVENT.validate_python(e, strict=False)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    terminal = {"response.completed", "response.incomplete", "response.failed"}
    assert events[-1]["type"] in terminal and not any(e["type"] in terminal for e in events[:-1])


# --- Responses API ------------------------------------------------------------------------------


def test_responses_plain_and_streamed_match_chat(server):
    client = server.client()
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0
    )
    r = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == chat.choices[0].message.content
    # the tiny model has no end-of-sequence id: it always runs into the limit
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 8
    assert r.usage.input_tokens_details.cached_tokens > 0  # the same prompt as the chat request

    stream = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=8, stream=True)
    events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == r.output_text
    raw = sse_events(
        server, "/v1/responses", {"model": MODEL, "input": "Hello there", "max_output_tokens": 8}
    )
    check_response_events(raw)
    assert [e["type"] for e in raw if "text" in e["type"] or "item" in e["type"] or "part" in e["type"]][
        :3
    ] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    # the SDK's stream helper accumulates the events (its final response needs response.completed,
    # see the thinking test)
    with client.responses.stream(model=MODEL, input="Hello there", max_output_tokens=8) as s:
        text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
    assert text == r.output_text


def test_responses_chain_retrieve_and_delete(server, loaded):
    client = server.client()
    first = client.responses.create(model=MODEL, input="Tell me a story", max_output_tokens=6)
    second = client.responses.create(
        model=MODEL, input="And then?", previous_response_id=first.id, max_output_tokens=6
    )
    # the chained request is the whole history: the same prompt as sending it explicitly
    history = [
        {"role": "user", "content": "Tell me a story"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"},
    ]
    explicit = client.responses.create(model=MODEL, input=history, max_output_tokens=6, store=False)
    assert second.usage.input_tokens == explicit.usage.input_tokens > first.usage.input_tokens
    # reused: all the first prompt shares with the second (it ended by opening an empty thought
    # channel, which the history does not repeat)
    prepare = loaded[1].prepare
    one, two = prepare(history[:1]).ids, prepare(history).ids
    shared = next(i for i, (a, b) in enumerate(zip(one, two, strict=False)) if a != b)
    assert second.usage.input_tokens_details.cached_tokens >= shared > 0
    assert second.output_text == explicit.output_text and second.previous_response_id == first.id

    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(first.id)
    assert first.id in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id=first.id, max_output_tokens=1)
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):  # store=False: never kept
        client.responses.retrieve(explicit.id)


def test_responses_image_and_audio(server):
    client = server.client()
    content = [{"type": "image_url", "image_url": {"url": png_uri()}}, {"type": "text", "text": "What?"}]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4
    )
    r = client.responses.create(
        model=MODEL,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": png_uri()},
                    {"type": "input_text", "text": "What?"},
                ],
            }
        ],
        max_output_tokens=4,
    )
    assert (
        r.usage.input_tokens == chat.usage.prompt_tokens and r.output_text == chat.choices[0].message.content
    )
    audio = {"data": wav_b64(), "format": "wav"}
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": audio}]}],
        max_tokens=1,
    )
    r = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": [{"type": "input_audio", "input_audio": audio}]}],
        max_output_tokens=1,
    )
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_response_store_is_lru_by_count_and_bytes():
    store = ResponseStore(max_items=2, max_bytes=10_000)
    for i in range(3):
        store.put({"id": f"r{i}"}, [{"type": "message", "content": "x"}])
    assert len(store) == 2
    with pytest.raises(Exception, match="r0"):
        store.get("r0")
    store.get("r1")  # r1 is now the most recent: r2 goes next
    store.put({"id": "r3"}, [])
    assert store.get("r1") and len(store) == 2
    with pytest.raises(Exception, match="r2"):
        store.get("r2")
    small = ResponseStore(max_items=10, max_bytes=300)
    for i in range(5):
        small.put({"id": f"r{i}"}, [{"text": "y" * 100}])
    assert small.nbytes <= 300 and len(small) == 2


def test_responses_function_tool_round_trip(tool_server):
    from tool_model import CALL_ARGUMENTS, CALL_NAME, TOOL

    srv, processor = tool_server
    client = srv.client()
    tool = {"type": "function", **TOOL["function"]}
    question = {"role": "user", "content": "What is the weather in Paris?"}
    r = client.responses.create(model="tool-model", input=[question], tools=[tool], max_output_tokens=30)
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == CALL_NAME and json.loads(call.arguments) == CALL_ARGUMENTS and call.call_id
    assert r.output_text == "" and r.status == "completed"
    raw = sse_events(
        srv,
        "/v1/responses",
        {"model": "tool-model", "input": [question], "tools": [tool], "max_output_tokens": 30},
    )
    check_response_events(raw)
    done = [e for e in raw if e["type"] == "response.function_call_arguments.done"]
    assert [json.loads(e["arguments"]) for e in done] == [CALL_ARGUMENTS]
    with client.responses.stream(
        model="tool-model", input=[question], tools=[tool], max_output_tokens=30
    ) as s:
        final = s.get_final_response()
    [streamed] = [o for o in final.output if o.type == "function_call"]
    assert (streamed.name, json.loads(streamed.arguments)) == (CALL_NAME, CALL_ARGUMENTS)

    result = {"temperature": 21}
    follow = [question, call.model_dump(exclude_none=True)]
    follow.append({"type": "function_call_output", "call_id": call.call_id, "output": json.dumps(result)})
    r2 = client.responses.create(model="tool-model", input=follow, tools=[tool], max_output_tokens=10)
    assert r2.output_text == "Sunny." and r2.status == "completed"
    rendered = [
        question,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": CALL_NAME, "arguments": CALL_ARGUMENTS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "name": CALL_NAME, "content": json.dumps(result)},
    ]
    assert r2.usage.input_tokens == len(processor.prepare(rendered, tools=[TOOL]).ids)
    # chained: only the tool's output is sent
    chained = client.responses.create(
        model="tool-model",
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": json.dumps(result)}],
        tools=[tool],
        max_output_tokens=10,
    )
    assert chained.output_text == "Sunny." and chained.usage.input_tokens == r2.usage.input_tokens
    assert chained.usage.input_tokens_details.cached_tokens > 0


def test_agents_sdk_runner_runs_a_function_tool(tool_server):
    agents = pytest.importorskip("agents")
    srv, _ = tool_server
    calls = []

    @agents.function_tool
    def get_weather(city: str, days: int = 1) -> str:
        """Current weather in a city."""
        calls.append((city, days))
        return f"{city}: sunny for {days} days"

    agents.set_tracing_disabled(True)
    agents.set_default_openai_client(
        openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0), use_for_tracing=False
    )
    agents.set_default_openai_api("responses")
    agent = agents.Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather])
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?", max_turns=3))
    assert calls == [("Paris", 3)]
    assert result.final_output == "Sunny."


def test_responses_thinking_goes_to_reasoning_items(thinking_server):
    client = thinking_server.client()
    r = client.responses.create(
        model="thinking-model", input="Weather?", reasoning={"effort": "high"}, max_output_tokens=10
    )
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.status == "completed"
    assert r.output[0].content[0].text == "Hmm." and r.output_text == "Sunny."
    with client.responses.stream(
        model="thinking-model", input="Weather?", reasoning={"effort": "high"}, max_output_tokens=10
    ) as s:
        final = s.get_final_response()
    assert [o.type for o in final.output] == ["reasoning", "message"] and final.output_text == "Sunny."
    raw = sse_events(
        thinking_server,
        "/v1/responses",
        {
            "model": "thinking-model",
            "input": "Weather?",
            "reasoning": {"effort": "high"},
            "max_output_tokens": 10,
        },
    )
    check_response_events(raw)
    assert [e["delta"] for e in raw if e["type"] == "response.reasoning_text.delta"] == ["Hmm."]
    off = client.responses.create(
        model="thinking-model", input="Weather?", reasoning={"effort": "minimal"}, max_output_tokens=10
    )
    assert [o.type for o in off.output] == ["message"] and off.output_text == "Sunny."
    # the reasoning item given back with the history is accepted (the template drops earlier
    # thoughts before a new user turn: the prompt equals the one without it)
    question = {"role": "user", "content": "Weather?"}
    back = [question, *[o.model_dump(exclude_none=True) for o in r.output], question]
    without = [question, {"role": "assistant", "content": "Sunny."}, question]
    kw = {"model": "thinking-model", "reasoning": {"effort": "high"}, "max_output_tokens": 10}
    again, plain = client.responses.create(input=back, **kw), client.responses.create(input=without, **kw)
    assert again.output_text == "Sunny." and again.usage.input_tokens == plain.usage.input_tokens


def responses_body(**kw):
    return {"model": MODEL, "input": "Hi", "max_output_tokens": 2, **kw}


RESPONSES_BAD = [
    ("hosted tool", responses_body(tools=[{"type": "web_search"}]), 400, "tools[0].type"),
    (
        "unknown item type",
        responses_body(input=[{"type": "item_reference", "id": "x"}]),
        400,
        "input[0]",
    ),
    (
        "unknown call id",
        responses_body(input=[{"type": "function_call_output", "call_id": "nope", "output": "1"}]),
        400,
        "input[0].call_id",
    ),
    (
        "schema keyword the engine cannot enforce",
        responses_body(
            text={
                "format": {
                    "type": "json_schema",
                    "name": "x",
                    "schema": {"type": "array", "uniqueItems": True},
                }
            }
        ),
        400,
        "text.format",
    ),
    ("input type", responses_body(input=5), 400, "input"),
    ("max_output_tokens zero", responses_body(max_output_tokens=0), 400, "max_output_tokens"),
    ("temperature type", responses_body(temperature="hot"), 400, "temperature"),
    ("unknown previous id", responses_body(previous_response_id="resp_nope"), 404, "previous_response_id"),
    ("unknown model", responses_body(model="gpt-5"), 404, "model"),
    (
        "remote image",
        responses_body(
            input=[{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]
        ),
        400,
        "input[0].content[0].image_url",
    ),
]


@pytest.mark.parametrize("case,body,status,named", RESPONSES_BAD, ids=[b[0] for b in RESPONSES_BAD])
def test_responses_bad_requests(server, case, body, status, named):
    r = httpx.post(server.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert named in error["message"] or named == error["param"], error


# --- Anthropic Messages API ---------------------------------------------------------------------


def check_anthropic_events(events: list[dict]) -> None:
    from anthropic.types import RawMessageStreamEvent

    adapter = TypeAdapter(RawMessageStreamEvent)
    for e in events:
        if e["type"] != "ping":
            adapter.validate_python(e)
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"


def test_messages_create_stream_and_auth(server):
    client = claude(server)
    chat = server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=8,
    )
    m = client.messages.create(
        model="claude-sonnet-4-5",
        system="Be brief.",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=8,
    )
    assert m.type == "message" and m.role == "assistant" and m.model == "claude-sonnet-4-5"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == chat.choices[0].message.content
    assert m.stop_reason == "max_tokens"
    total = m.usage.input_tokens + m.usage.cache_read_input_tokens
    assert total == chat.usage.prompt_tokens and m.usage.cache_read_input_tokens > 0
    assert m.usage.output_tokens == 8

    with client.messages.stream(
        model="claude-sonnet-4-5",
        system=[{"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=8,
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == m.content[0].text == final.content[0].text and final.stop_reason == "max_tokens"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
    raw = sse_events(server, "/v1/messages", body, {"anthropic-version": "2023-06-01"})
    check_anthropic_events(raw)
    assert {"ping", "content_block_delta", "message_delta"} <= {e["type"] for e in raw}

    # x-api-key (what the SDK sends) works; a wrong key is Anthropic's authentication_error
    with pytest.raises(anthropic.AuthenticationError) as e:
        claude(server, "sk-wrong").messages.create(model=MODEL, messages=body["messages"], max_tokens=1)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    ok = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": KEY, "anthropic-beta": "x"})
    assert ok.status_code == 200


def test_messages_count_tokens_and_image(server):
    client = claude(server)
    m = client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "Hello there"}])
    chat = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=1
    )
    assert m.input_tokens == chat.usage.prompt_tokens
    data = png_uri().split(",", 1)[1]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    content = [image, {"type": "text", "text": "What?"}]
    r = client.messages.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4)
    chat = server.client().chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_uri()}},
                    {"type": "text", "text": "What?"},
                ],
            }
        ],
        max_tokens=4,
    )
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert r.content[0].text == chat.choices[0].message.content
    counted = client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": content}])
    assert counted.input_tokens == chat.usage.prompt_tokens


def test_messages_tool_use_round_trip(tool_server):
    from tool_model import CALL_ARGUMENTS, CALL_NAME, TOOL

    srv, processor = tool_server
    client = claude(srv)
    tool = {
        "name": CALL_NAME,
        "description": TOOL["function"]["description"],
        "input_schema": TOOL["function"]["parameters"],
    }
    question = {"role": "user", "content": "What is the weather in Paris?"}
    m = client.messages.create(model="claude-opus-4", messages=[question], tools=[tool], max_tokens=30)
    assert m.stop_reason == "tool_use"
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert use.name == CALL_NAME and use.input == CALL_ARGUMENTS
    with client.messages.stream(model="claude-opus-4", messages=[question], tools=[tool], max_tokens=30) as s:
        final = s.get_final_message()
    assert [(b.type, b.input) for b in final.content] == [("tool_use", CALL_ARGUMENTS)]
    raw = sse_events(
        srv, "/v1/messages", {"model": "m", "messages": [question], "tools": [tool], "max_tokens": 30}
    )
    check_anthropic_events(raw)
    assert [e["delta"]["type"] for e in raw if e["type"] == "content_block_delta"] == ["input_json_delta"]

    follow = [
        question,
        {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C, clear"}],
        },
    ]
    r = client.messages.create(model="claude-opus-4", messages=follow, tools=[tool], max_tokens=10)
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == "Sunny."
    assert r.stop_reason == "end_turn" and r.usage.cache_read_input_tokens > 0
    rendered = [
        question,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": use.id,
                    "type": "function",
                    "function": {"name": CALL_NAME, "arguments": CALL_ARGUMENTS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": use.id, "name": CALL_NAME, "content": "21 C, clear"},
    ]
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == len(
        processor.prepare(rendered, tools=[TOOL]).ids
    )
    # tool_choice "any" / "tool": the call grammar forces the call (nothing is added to the prompt);
    # without the structured extra, the call is opened after the generation prompt
    template = processor.apply_chat_template([question], tools=[TOOL])
    grammar = constraints_available()
    for choice, forced in (
        ({"type": "any"}, "" if grammar else "<|tool_call>call:"),
        ({"type": "tool", "name": CALL_NAME}, "" if grammar else "<|tool_call>call:get_weather{"),
    ):
        r = client.messages.create(
            model="m", messages=[question], tools=[tool], tool_choice=choice, max_tokens=1
        )
        total = r.usage.input_tokens + r.usage.cache_read_input_tokens
        assert total == len(processor.encode_text(template + forced, add_bos=False))


def test_messages_thinking_blocks(thinking_server):
    client = claude(thinking_server)
    question = [{"role": "user", "content": "Weather?"}]
    thinking = {"type": "enabled", "budget_tokens": 1024}
    m = client.messages.create(model="thinking-model", messages=question, thinking=thinking, max_tokens=10)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content] == [
        ("thinking", "Hmm."),
        ("text", "Sunny."),
    ]
    assert m.stop_reason == "end_turn"
    with client.messages.stream(
        model="thinking-model", messages=question, thinking=thinking, max_tokens=10
    ) as s:
        events = [e.type for e in s]
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"] and "thinking" in events
    raw = sse_events(
        thinking_server,
        "/v1/messages",
        {"model": "thinking-model", "messages": question, "thinking": thinking, "max_tokens": 10},
    )
    check_anthropic_events(raw)
    assert [e["delta"]["type"] for e in raw if e["type"] == "content_block_delta"] == [
        "thinking_delta",
        "text_delta",
    ]
    off = client.messages.create(model="thinking-model", messages=question, max_tokens=10)
    assert [b.type for b in off.content] == ["text"]
    # thinking given back with the assistant turn is accepted
    back = [*question, {"role": "assistant", "content": [b.model_dump() for b in m.content]}, *question]
    again = client.messages.create(model="thinking-model", messages=back, thinking=thinking, max_tokens=10)
    assert again.content[-1].text == "Sunny."


def messages_body(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kw}


MESSAGES_BAD = [
    (
        "missing max_tokens",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
        400,
        "max_tokens",
    ),
    ("messages type", messages_body(messages="Hi"), 400, "messages"),
    (
        "unknown block",
        messages_body(messages=[{"role": "user", "content": [{"type": "video"}]}]),
        400,
        "messages[0].content",
    ),
    (
        "server tool",
        messages_body(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
        400,
        "tools[0].type",
    ),
    (
        "unknown tool_use_id",
        messages_body(
            messages=[
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"}]}
            ]
        ),
        400,
        "tool_use_id",
    ),
    (
        "url image",
        messages_body(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}],
                }
            ]
        ),
        400,
        "remote URLs are not fetched",
    ),
    (
        "schema keyword the engine cannot enforce",
        messages_body(
            output_config={"format": {"type": "json_schema", "schema": {"not": {"type": "string"}}}}
        ),
        400,
        "output_config.format",
    ),
    ("temperature range", messages_body(temperature=1.5), 400, "temperature"),
    ("unknown model", messages_body(model="claude-unknown"), 404, "claude-unknown"),
]


@pytest.mark.parametrize("case,body,status,named", MESSAGES_BAD, ids=[b[0] for b in MESSAGES_BAD])
def test_messages_bad_requests(server, case, body, status, named):
    r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": KEY})
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert named in body["error"]["message"], body
    assert body["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_model_aliases_and_still_serving(server):
    models = [m.id for m in server.client().models.list()]
    assert models == [MODEL, "claude-sonnet-4-5"]
    with pytest.raises(openai.NotFoundError) as e:
        server.client().responses.create(model="gpt-5", input="Hi", max_output_tokens=1)
    assert "claude-sonnet-4-5" in e.value.body["message"]
    r = claude(server).messages.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
    )
    assert r.usage.output_tokens == 1


def test_messages_stop_sequences(server):
    client = claude(server)
    question = [{"role": "user", "content": "Hello there"}]
    full = client.messages.create(model=MODEL, messages=question, max_tokens=8).content[0].text
    word = full[-3:]  # the answer's end
    assert full.find(word) > 0 and word.strip()
    m = client.messages.create(model=MODEL, messages=question, max_tokens=8, stop_sequences=["@@@", word])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == word
    assert m.content[0].text == full[: full.find(word)].strip()


def test_responses_namespace_tools_are_declared_with_their_namespace(tool_server):
    """Codex CLI groups tools in a `namespace`: its functions are declared as NAMESPACE.NAME, and a
    call given back with its namespace is rendered under that name."""
    import copy

    from tool_model import TOOL

    srv, processor = tool_server
    fn = {"type": "function", **TOOL["function"]}
    named = copy.deepcopy(TOOL)
    named["function"]["name"] = "weather.get_weather"
    question = {"role": "user", "content": "Hi"}
    namespace = {"type": "namespace", "name": "weather", "description": "Weather tools", "tools": [fn]}
    r = srv.client().responses.create(model="m", input=[question], tools=[namespace], max_output_tokens=1)
    assert r.usage.input_tokens == len(processor.prepare([question], tools=[named]).ids)
    call = {"type": "function_call", "call_id": "c1", "namespace": "weather", "name": "get_weather"}
    items = [question, {**call, "arguments": '{"city": "Paris"}'}]
    items.append({"type": "function_call_output", "call_id": "c1", "output": "sunny"})
    r = srv.client().responses.create(model="m", input=items, tools=[namespace], max_output_tokens=1)
    rendered = [
        question,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather.get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "weather.get_weather", "content": "sunny"},
    ]
    assert r.usage.input_tokens == len(processor.prepare(rendered, tools=[named]).ids)


def test_responses_instructions_and_developer_messages_are_one_system_turn(server):
    client = server.client()
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief.\n\nUse tools."},
            {"role": "user", "content": "Hi"},
        ],
        max_tokens=1,
    )
    r = client.responses.create(
        model=MODEL,
        instructions="Be brief.",
        input=[{"role": "developer", "content": "Use tools."}, {"role": "user", "content": "Hi"}],
        max_output_tokens=1,
    )
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_chat_tool_result_for_an_unknown_call_is_400(server):
    """The shared conversation layer checks tool results for every API, Chat Completions too."""
    body = {
        "model": MODEL,
        "max_tokens": 1,
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "tool", "tool_call_id": "nope", "content": "1"},
        ],
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "'nope'" in r.json()["error"]["message"]


def test_evicted_response_is_a_clear_404(loaded):
    model, processor = loaded
    srv = Server(create_app(model, processor, model_id=MODEL, store_responses=1))
    try:
        client = srv.client()
        first = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
        client.responses.create(model=MODEL, input="Hello", max_output_tokens=1)
        with pytest.raises(openai.NotFoundError) as e:
            client.responses.create(
                model=MODEL, input="x", previous_response_id=first.id, max_output_tokens=1
            )
        assert "evicted" in e.value.body["message"] and e.value.body["param"] == "previous_response_id"
    finally:
        srv.close()


def test_messages_thinking_budget_closes_the_thought_channel(tmp_path):
    """budget_tokens bounds the thought channel: once it is spent, <channel|> is written and the
    model answers. This model thinks "Hmm." and " Let me think." (one token each) before answering."""
    import tool_model

    pieces = ["<|channel>", "thought\nHmm.", " Let me think.", "<channel|>", "Sunny."]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tool_model, "PIECES", pieces)
        mp.setattr(tool_model, "STOP", "<turn|>")
        tool_model.build_tool_model(tmp_path)
    model, processor = load(tmp_path)
    srv = Server(create_app(model, processor, model_id="m"))
    try:
        client = claude(srv)
        kw = {"model": "m", "messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 10}
        full = client.messages.create(thinking={"type": "enabled", "budget_tokens": 2}, **kw)
        assert [(b.type, getattr(b, "thinking", None) or b.text) for b in full.content] == [
            ("thinking", "Hmm. Let me think."),
            ("text", "Sunny."),
        ]
        cut = client.messages.create(thinking={"type": "enabled", "budget_tokens": 1}, **kw)
        assert [(b.type, getattr(b, "thinking", None) or b.text) for b in cut.content] == [
            ("thinking", "Hmm."),
            ("text", "Sunny."),
        ]
        # <|channel>, Hmm., <channel|> (written for the model), Sunny., <turn|>: one token fewer
        assert cut.usage.output_tokens == full.usage.output_tokens - 1 == 5
        with client.messages.stream(thinking={"type": "enabled", "budget_tokens": 1}, **kw) as s:
            streamed = s.get_final_message()
        assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in cut.content]
    finally:
        srv.close()


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def test_structured_output_on_responses_and_messages(tmp_path, server):
    """`text.format` (Responses) and `output_config.format` (Messages) go through the same compiled
    grammar as Chat Completions' `response_format`: a random tiny model answers schema-valid JSON.
    A model without an end-of-sequence token (the module's server) cannot end one: a 400."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    headers = {"Authorization": f"Bearer {KEY}"}
    fmt = {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}
    r = httpx.post(
        server.url + "/v1/responses",
        json={"model": MODEL, "input": "Answer.", "text": {"format": fmt}},
        headers=headers,
    )
    assert r.status_code == 400 and "end-of-sequence" in r.json()["error"]["message"], r.text
    model, processor = load(save_checkpoint(tmp_path / "ckpt"))  # with its end-of-sequence ids
    server = Server(create_app(model, processor, model_id=MODEL, api_key=KEY))
    r = httpx.post(
        server.url + "/v1/responses",
        json={"model": MODEL, "input": "Answer.", "max_output_tokens": 48, "text": {"format": fmt}},
        headers=headers,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed"
    jsonschema.validate(json.loads(body["output"][-1]["content"][0]["text"]), SCHEMA)
    r = httpx.post(
        server.url + "/v1/messages",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Answer."}],
            "max_tokens": 48,
            "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
        },
        headers={"x-api-key": KEY},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stop_reason"] == "end_turn"
    jsonschema.validate(json.loads(body["content"][-1]["text"]), SCHEMA)
    server.close()
