"""Anthropic streaming without a cluster: an engine failure after the stream began reaches the
`anthropic` SDK as an `error` event, not a silent cut (the pipeline fails on purpose; HTTP and the
SDK are real); and the content-block events of tool calls the demo model never writes by itself."""

import json
import socket
import threading
import time

import anthropic
import pytest
import uvicorn
from fastapi import FastAPI, Request

from app.api.errors import ConduitError
from app.api.protocol import GenerateRequest, ToolSpec
from app.api.wire import anthropic as adapter
from app.engine.engine import RequestOutput
from app.engine.sampling_params import SamplingParams


class FailingPipeline:
    """Streams one delta, then fails as an overloaded replica would."""

    async def stream(self, req):
        async def deltas():
            yield 0, RequestOutput(req.request_id, [5], "Hi", num_prompt_tokens=3, num_output_tokens=1)
            raise ConduitError("the model replica is overloaded", 503)

        return deltas()


@pytest.fixture(scope="module")
def base_url():
    app = FastAPI()

    @app.middleware("http")
    async def set_request_id(request: Request, call_next):
        request.state.request_id = "r1"
        return await call_next(request)

    app.include_router(adapter.routes(FailingPipeline(), None).router)  # the Anthropic routes read no config
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


def test_error_after_first_token_is_an_error_event(base_url):
    client = anthropic.Anthropic(base_url=base_url, api_key="x", max_retries=0)
    seen = []
    with pytest.raises(anthropic.APIStatusError) as e:
        for ev in client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}], stream=True):
            seen.append(ev.type)
    assert seen == ["message_start", "content_block_start", "content_block_delta"]
    error = {"type": "overloaded_error", "message": "the model replica is overloaded"}
    assert e.value.body == {"type": "error", "error": error}


WEATHER = ToolSpec("get_weather", None, {"type": "object", "properties": {"city": {"type": "string"}}})


def events_of(blocks: adapter.BlockEvents, deltas: list[str]) -> list[dict]:
    lines = []
    for i, delta in enumerate(deltas):
        lines += blocks.feed(delta, final=i == len(deltas) - 1)
    return [json.loads(line.split("\ndata: ")[1]) for line in lines]


def request(tool_choice: str, tool_name: str | None = None) -> GenerateRequest:
    return GenerateRequest("r", "m", SamplingParams(), messages=[], tools=[WEATHER], tool_choice=tool_choice,
                           tool_name=tool_name)


def test_auto_mode_streams_text_then_a_tool_use_block():
    text = 'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    events = events_of(adapter.BlockEvents(request("auto"), None), [text[i : i + 7] for i in range(0, len(text), 7)])
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["content_block_start", "ping"] and events[0]["content_block"]["type"] == "text"
    streamed = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta" and e["index"] == 0)
    assert streamed.strip() == "Let me look."
    tool = [e for e in events if e.get("index") == 1]
    assert [e["type"] for e in tool] == ["content_block_start", "content_block_delta", "content_block_stop"]
    assert tool[0]["content_block"]["name"] == "get_weather" and tool[0]["content_block"]["id"].startswith("toolu_")
    assert json.loads(tool[1]["delta"]["partial_json"]) == {"city": "Paris"}
    assert kinds.count("content_block_stop") == 2 and kinds[-1] == "content_block_stop"


def test_forced_mode_passes_arguments_on_as_they_arrive():
    text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    events = events_of(adapter.BlockEvents(request("required", "get_weather"), None), pieces)
    block = events[0]["content_block"]
    assert (block["type"], block["name"], block["input"]) == ("tool_use", "get_weather", {})
    fragments = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert len(fragments) > 1 and json.loads("".join(fragments)) == {"city": "Paris"}
    assert events[-1] == {"type": "content_block_stop", "index": 0}


def test_forced_call_cut_short_before_its_name_is_text():
    events = events_of(adapter.BlockEvents(request("required"), None), ['{"na', 'me": "get_'])
    assert events[0]["content_block"]["type"] == "text"
    assert "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta") == '{"name": "get_'


def test_disable_parallel_tool_use_keeps_the_first_call():
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>'
    text = call % "Paris" + call % "Rome"
    starts = [e for e in events_of(adapter.BlockEvents(request("auto"), 1), [text]) if e["type"] == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["tool_use"]
    _, calls = adapter.split_calls(request("auto"), text, 1)
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris"]
    assert len(adapter.split_calls(request("auto"), text, None)[1]) == 2
