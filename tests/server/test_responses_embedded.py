"""The Responses API with the embedded SmolLM2-135M-Instruct behind a real ``serve`` process: a streamed
answer that ends on its own (``get_final_response``), the OpenAI Agents SDK (its default Responses model
class) running an agent with a function tool, and the acceptance chain of issue 13: 10 responses
through ``previous_response_id``, each adding ~2,000 tokens (20k in all, past the model's 8,192
positions), each reusing >= 90% of the previous response's input plus output from the session cache.

The chain prefills 20k tokens (about 30 s on an idle 2-core CPU, minutes on a busy one), so it runs only
with ``SINKSERVE_HEAVY_TESTS=1``; the tiny-model chain of tests/embedded_server/test_responses.py runs always."""

from __future__ import annotations

import os
from importlib import resources

import pytest

from tests.server.weather_agent import weather_agent

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


async def test_agents_sdk_runs_a_tool_and_chains(embedded_server):
    """tool_choice required with ``stop_on_first_tool`` (the 135M model, asked again after a tool result,
    calls the tool again rather than answering: the SDK's documented way to end on the tool's output)."""
    agents = pytest.importorskip("agents")
    agent, cities = weather_agent(agents, agents.OpenAIResponsesModel, embedded_server.url)
    first = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=3)
    assert cities == ["Paris"] and first.final_output == "It is sunny and 21 C in Paris."
    [response] = first.raw_responses
    assert [item.type for item in response.output] == ["function_call"]
    second = await agents.Runner.run(agent, "And in Rome?", previous_response_id=first.last_response_id,
                                     max_turns=3)
    assert cities[-1] == "Rome" and second.final_output == "It is sunny and 21 C in Rome."
    before = response.usage.input_tokens + response.usage.output_tokens
    assert second.raw_responses[0].usage.input_tokens_details.cached_tokens >= 0.9 * before


def test_stream_get_final_response_is_the_concatenated_deltas(embedded_client):
    with embedded_client.responses.stream(model=MODEL, input="What is the capital of France?", temperature=0,
                                 max_output_tokens=60) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.completed_at is not None
    assert final.output_text == "".join(deltas) and "Paris" in final.output_text
    assert embedded_client.responses.retrieve(final.id).output_text == final.output_text


@pytest.mark.skipif(not os.environ.get("SINKSERVE_HEAVY_TESTS"), reason="20k-token chain: SINKSERVE_HEAVY_TESTS=1")
def test_chain_of_ten_long_responses_reuses_the_session(embedded_client):
    text = resources.files("engine").joinpath("data/tinyshakespeare.txt").read_text()
    previous = None
    for turn in range(10):
        passage = text[turn * 8000:(turn + 1) * 8000]  # ~2,000 tokens of Shakespeare
        response = embedded_client.responses.create(
            model=MODEL, input=f"{passage}\n\nWho speaks first in this passage?", temperature=0,
            max_output_tokens=16, previous_response_id=previous.id if previous else None,
        )
        assert response.status in ("completed", "incomplete")
        if previous is not None:
            before = previous.usage.input_tokens + previous.usage.output_tokens
            assert response.usage.input_tokens >= before + 1500
            assert response.usage.input_tokens_details.cached_tokens >= 0.9 * before, (turn, response.usage)
        previous = response
    assert previous.usage.input_tokens > 18000  # past the model's 8,192 positions
