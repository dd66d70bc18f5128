"""Record exchanges of the official clients with a running `gemma-mlx serve` (port 8097)."""

import asyncio
import json

import agents
import anthropic
import openai
from langchain_openai import ChatOpenAI

URL = "http://127.0.0.1:8097"
oa = openai.OpenAI(base_url=URL + "/v1", api_key="sk-local")
print(">>> openai responses.create")
r = oa.responses.create(
    model="gemma-3-270m-float32", input="The capital of France is", max_output_tokens=8, temperature=0
)
print(json.dumps(r.model_dump(exclude_none=True), indent=1)[:1500])
print(">>> openai responses.create(previous_response_id=...)")
r2 = oa.responses.create(
    model="gemma-3-270m-float32",
    previous_response_id=r.id,
    input="And of Italy?",
    max_output_tokens=8,
    temperature=0,
)
print(
    repr(r2.output_text),
    r2.usage.input_tokens,
    "input tokens,",
    r2.usage.input_tokens_details.cached_tokens,
    "cached",
)
print(">>> openai responses stream event types")
print(
    [
        e.type
        for e in oa.responses.create(
            model="gemma-3-270m-float32", input="Hello", max_output_tokens=4, stream=True
        )
    ]
)
print(">>> anthropic messages.create (x-api-key)")
an = anthropic.Anthropic(base_url=URL, api_key="sk-local")
m = an.messages.create(
    model="claude-sonnet-4-5",
    system="Be brief.",
    messages=[{"role": "user", "content": "The capital of France is"}],
    max_tokens=8,
)
print(json.dumps(m.model_dump(exclude_none=True), indent=1))
print(">>> anthropic messages.count_tokens")
print(
    an.messages.count_tokens(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "The capital of France is"}]
    )
)
print(">>> anthropic messages.stream")
with an.messages.stream(
    model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
) as s:
    print([e.type for e in s])
print(">>> openai-agents Runner (Responses API), the 270M base model")

agents.set_tracing_disabled(True)
agents.set_default_openai_client(
    openai.AsyncOpenAI(base_url=URL + "/v1", api_key="sk-local"), use_for_tracing=False
)
agents.set_default_openai_api("responses")
agent = agents.Agent(
    name="assistant",
    instructions="Answer briefly.",
    model="gemma-3-270m-float32",
    model_settings=agents.ModelSettings(max_tokens=12),
)
try:
    res = asyncio.run(agents.Runner.run(agent, "The capital of France is"))
    print(repr(res.final_output))
except Exception as e:
    print(type(e).__name__, e)
print(">>> openai-agents Runner with a function tool (tests/tool_model.py checkpoint on :8098)")
agents.set_default_openai_client(
    openai.AsyncOpenAI(base_url="http://127.0.0.1:8098/v1", api_key="-"), use_for_tracing=False
)


@agents.function_tool
def get_weather(city: str, days: int = 1) -> str:
    """Current weather in a city."""
    print(f"  [tool] get_weather(city={city!r}, days={days})")
    return f"{city}: sunny for {days} days"


agent = agents.Agent(name="weather", instructions="Use the tool.", model="tool-model", tools=[get_weather])
res = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?"))
print("final_output:", repr(res.final_output), [type(i).__name__ for i in res.new_items])
print(">>> langchain-openai ChatOpenAI(use_responses_api=True)")

llm = ChatOpenAI(
    model="gemma-3-270m-float32",
    base_url=URL + "/v1",
    api_key="sk-local",
    use_responses_api=True,
    max_tokens=8,
)
msg = llm.invoke("The capital of France is")
print(repr(msg.text), msg.usage_metadata)
llm = ChatOpenAI(model="gemma-3-270m-float32", base_url=URL + "/v1", api_key="sk-local", max_tokens=8)
msg = llm.invoke("The capital of France is")
print("chat completions:", repr(msg.content), msg.usage_metadata)
