"""The agent frameworks whose default OpenAI model is the Responses API, against the shared app: the
OpenAI Agents SDK runs an agent that calls a function tool and answers from its result; pydantic-ai's
OpenAIResponsesModel returns a structured output; the Vercel AI SDK's `@ai-sdk/openai` responses()
model runs generateText and streamText (tests/node/vercel_ai_sdk.mjs responses)."""

import json
import os
import subprocess
from typing import Literal

import pytest
from pydantic import BaseModel

from tests.e2e.conftest import MODEL
from tests.e2e.test_vercel_ai_sdk import node_project  # noqa: F401 (the fixture: npm ci once)

pytestmark = pytest.mark.e2e


def test_openai_agents_sdk_calls_a_tool_and_answers(server, async_client, client):
    from agents import Agent, ModelSettings, Runner, function_tool, set_default_openai_client, set_tracing_disabled

    set_tracing_disabled(True)  # traces would go to OpenAI's servers
    set_default_openai_client(async_client, use_for_tracing=False)
    calls = []

    @function_tool
    def get_weather(city: Literal["Paris", "Oslo", "Rome"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"Sunny in {city}"

    # tool_choice required: the tiny random model would rarely choose a tool by itself; the SDK resets
    # it to auto after the call (reset_tool_choice), so the agent then answers, in the Forecast format
    # (a short schema: the random model's free text would run to the limit, which the SDK treats as an error)
    agent = Agent(name="weather", instructions="Answer from the tool's result.", model=MODEL, tools=[get_weather],
                  output_type=Forecast, model_settings=ModelSettings(tool_choice="required", max_tokens=80,
                                                                     temperature=0))
    result = Runner.run_sync(agent, "What is the weather in Oslo?", max_turns=3)
    assert len(calls) == 1 and calls[0] in ("Paris", "Oslo", "Rome")
    assert isinstance(result.final_output, Forecast)
    last = result.raw_responses[-1]
    stored = client.responses.input_items.list(last.response_id, order="asc").data
    outputs = [item for item in stored if item.type == "function_call_output"]
    assert [o.output for o in outputs] == [f"Sunny in {calls[0]}"]  # the answer was made from the tool's result
    assert Forecast.model_validate_json(client.responses.retrieve(last.response_id).output_text) == result.final_output


class Forecast(BaseModel):
    sky: Literal["sunny", "cloudy", "rainy"]


class City(BaseModel):  # short fields: the tiny random model writes each in a few tokens
    name: Literal["Paris", "Oslo", "Rome"]
    size: Literal["small", "large"]


def test_pydantic_ai_structured_output(server, async_client):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    model = OpenAIResponsesModel(MODEL, provider=OpenAIProvider(openai_client=async_client))
    agent = Agent(model, output_type=City, model_settings=ModelSettings(max_tokens=120, temperature=0))
    result = agent.run_sync("A large city")
    assert isinstance(result.output, City) and result.output.size in ("small", "large")


def test_vercel_ai_sdk_responses(node_project, server, client):  # noqa: F811
    env = {**os.environ, "CONDUIT_URL": server, "CONDUIT_MODEL": MODEL}
    run = subprocess.run(["node", "vercel_ai_sdk.mjs", "responses"], cwd=node_project, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"node script failed:\n{run.stdout}\n{run.stderr}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    expected = client.responses.create(model=MODEL, instructions="Be brief.", input="Hello there",
                                       max_output_tokens=12, temperature=0)
    assert result["generated"] == result["streamed"] == expected.output_text
    assert result["usage"]["inputTokens"] == expected.usage.input_tokens
    assert client.responses.retrieve(result["responseId"]).output_text == result["generated"]
