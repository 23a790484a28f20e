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


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("echo", [None, "Say \"hi\"\n"])
def test_plain_chunks_are_the_bytes_of_the_general_path(kind, include_usage, echo):
    """A text delta's chunk is formatted from a pre-rendered envelope (the per-token path): its line
    must be the one `sse` writes for the whole payload, whatever the text, ids and model hold."""
    if kind == "chat" and echo:
        return
    texts = ["", "Hello", ' "quoted" \\ back', "tab\tnew\nline\x00\x1f", "é ü 漢字 😀", "\ud800"]
    builder = ResponseBuilder(kind, 'cmpl-"odd"\\id', "m/ödel\n", include_usage, echo=echo)
    for first in (True, False):
        for text in texts:
            for finish_reason in (None, "stop", "length"):
                out = output(text, finish_reason)
                if kind == "chat":
                    delta = {"content": text} if text else {}
                    choice = {"index": 2, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                else:
                    choice = {"index": 2, "text": (echo or "") + text if first else text, "logprobs": None,
                              "finish_reason": finish_reason}
                assert builder._plain(2, out, first) == builder._chunk(choice)


def test_sse_response_sends_each_delta_at_once_and_the_last_with_the_end():
    """Each delta's events leave in one body message as soon as it arrives; the last delta, the
    usage chunk and [DONE] leave in the message that ends the body. A failure mid-stream is an error
    event, then [DONE]."""
    import asyncio

    from app.api.errors import ConduitError
    from app.api.wire.openai import SSE_DONE, SSEResponse

    async def deltas(outs, error=None):
        for out in outs:
            yield 0, out
        if error is not None:
            raise error

    def run(stream, include_usage=True):
        builder = ResponseBuilder("chat", "chatcmpl-1", "m", include_usage)
        sent = []

        async def send(message):
            sent.append(message)

        asyncio.run(SSEResponse(builder, stream, 1).stream_response(send))
        return sent, builder

    outs = [output("He", None), output("ll", None), output("o", "stop")]
    sent, builder = run(deltas(outs))
    assert sent[0]["type"] == "http.response.start"
    bodies = [m["body"].decode() for m in sent[1:]]
    assert [m["more_body"] for m in sent[1:]] == [True, True, False]
    reference = ResponseBuilder("chat", "chatcmpl-1", "m", True)
    reference.created, reference._head = builder.created, builder._head  # the same second
    events = [reference.render(0, out, first=i == 0) for i, out in enumerate(outs)]
    assert bodies[0] == events[0] and bodies[0].count("data: ") == 2  # the role chunk and the first text
    assert bodies[1] == events[1]
    assert bodies[2] == events[2] + reference.usage_chunk([outs[-1]]) + SSE_DONE

    sent, _ = run(deltas(outs[:1], ConduitError("boom", 500)))
    last = sent[-1]["body"].decode()
    assert sent[-1]["more_body"] is False and '"message":"boom"' in last and last.endswith(SSE_DONE)
