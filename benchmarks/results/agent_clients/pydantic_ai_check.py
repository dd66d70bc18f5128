"""pydantic-ai's Responses model against `gemma-mlx serve` (the tool checkpoint on :8098)."""

from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIResponsesModel
from pydantic_ai.providers.openai import OpenAIProvider

model = OpenAIResponsesModel(
    "tool-model", provider=OpenAIProvider(base_url="http://127.0.0.1:8098/v1", api_key="-")
)
agent = Agent(model, instructions="Use the tool.")


@agent.tool_plain
def get_weather(city: str, days: int = 1) -> str:
    """Current weather in a city."""
    print(f"  [tool] get_weather(city={city!r}, days={days})")
    return f"{city}: sunny for {days} days"


result = agent.run_sync("What is the weather in Paris?")
print("output:", repr(result.output))
print([type(p).__name__ for m in result.all_messages() for p in m.parts])
