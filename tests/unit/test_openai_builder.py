"""The OpenAI adapter's response objects (app/api/wire/openai.py ResponseBuilder), built from engine
outputs without a server, against OpenAI's published schemas (tests/openapi_contract.py); the
served routes are checked the same way in tests/e2e/test_openai_contract.py."""

import json

import pytest

from app.api.protocol import GenerateRequest, ToolSpec
from app.api.wire.openai import ResponseBuilder
from app.engine.engine import RequestOutput
from app.engine.sampling_params import SamplingParams
from tests.openapi_contract import validate

TOOLS = [ToolSpec("get_weather", None, {"type": "object", "properties": {"city": {"type": "string"}}}),
         ToolSpec("get_time")]
CALL = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'


def request(tool_choice="auto", tool_name=None, tools=TOOLS) -> GenerateRequest:
    return GenerateRequest("r", "m", SamplingParams(), messages=[{"role": "user", "content": "hi"}],
                           tools=tools, tool_choice=tool_choice, tool_name=tool_name)


def output(text: str, finish_reason: str | None = "length") -> RequestOutput:
    return RequestOutput("r", text=text, finished=finish_reason is not None, finish_reason=finish_reason,
                         num_prompt_tokens=3, num_output_tokens=len(text))


def streamed(builder: ResponseBuilder, text: str, finish_reason: str, step: int = 5) -> list[dict]:
    chunks = []
    for i in range(0, len(text), step):
        last = i + step >= len(text)
        out = output(text[i : i + step], finish_reason if last else None)
        chunks += [json.loads(line.removeprefix("data: ")) for line in builder.chunks(0, out, first=i == 0)]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return chunks


def test_plain_message_has_refusal_null():
    body = ResponseBuilder("chat", "chatcmpl-1", "m", False).complete([output("Hello"), output("Hi", "stop")])
    validate(body, "CreateChatCompletionResponse")
    assert [c["message"]["refusal"] for c in body["choices"]] == [None, None]


@pytest.mark.parametrize("tool_name", [None, "get_weather"])
@pytest.mark.parametrize("cut", [2, 12, 30, len(CALL) - 1])
def test_forced_call_cut_short_is_a_call_whole_and_streamed(cut, tool_name):
    req = request("required", tool_name)
    body = ResponseBuilder("chat", "chatcmpl-1", "m", False, req).complete([output(CALL[:cut])])
    validate(body, "CreateChatCompletionResponse")
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert '{"city": "Oslo"}'.startswith(call["function"]["arguments"])
    chunks = streamed(ResponseBuilder("chat", "chatcmpl-1", "m", False, req), CALL[:cut], "length")
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [d["function"]["name"] for d in deltas if "name" in d["function"]] == ["get_weather"]
    assert "".join(d["function"]["arguments"] for d in deltas) == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks)


def test_forced_call_whole_finishes_with_tool_calls():
    req = request("required")
    body = ResponseBuilder("chat", "chatcmpl-1", "m", False, req).complete([output(CALL, "stop")])
    validate(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    chunks = streamed(ResponseBuilder("chat", "chatcmpl-1", "m", False, req), CALL, "stop")
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_tool_call_keeps_to_the_schema():
    text = f"Sure. <tool_call>{CALL}</tool_call>"
    body = ResponseBuilder("chat", "chatcmpl-1", "m", False, request()).complete([output(text, "stop")])
    validate(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    streamed(ResponseBuilder("chat", "chatcmpl-1", "m", True, request()), text, "stop")


def test_completion_chunks_with_usage_keep_to_the_schema():
    """Completions' schema (one for bodies and chunks) has no `usage: null`: only the last chunk has usage."""
    builder = ResponseBuilder("completion", "cmpl-1", "m", True)
    outs = [output("Hello", None), output(" there", "length")]
    lines = [line for i, out in enumerate(outs) for line in builder.chunks(0, out, first=i == 0)]
    lines.append(builder.usage_chunk([outs[-1]]))
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines]
    for chunk in chunks:
        validate(chunk, "CreateCompletionResponse")
    assert ["usage" in c for c in chunks] == [False, False, True]
