"""The OpenAI Agents SDK agent the client tests run: one function tool, ``tool_choice="required"``.

``stop_on_first_tool``: asked again after a tool result, the 135M model calls the tool again rather
than answering, so the run ends on the tool's output (the SDK's documented way)."""

from __future__ import annotations

MODEL = "SmolLM2-135M-Instruct"


def weather_agent(agents, model_class, url: str):
    """(agent, cities): the agent over ``model_class`` (chat completions or Responses) at ``url``, and the
    list of cities its tool was called with."""
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    cities: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        cities.append(city)
        return f"It is sunny and 21 C in {city}."

    model = model_class(model=MODEL, openai_client=AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))
    settings = agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=80, parallel_tool_calls=False)
    agent = agents.Agent(name="weather", instructions="You answer questions about the weather.", model=model,
                         tools=[get_weather], model_settings=settings, tool_use_behavior="stop_on_first_tool")
    return agent, cities
