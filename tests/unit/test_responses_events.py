"""The Responses output and its stream events (app/api/wire/responses_stream.py) built from engine
outputs: the event order OpenAI's SDKs parse, sequence numbers, text, forced and free tool calls,
a reply cut by the limit, a failure; every event valid against OpenAI's OpenAPI document."""

import json

from app.api.errors import ConduitError
from app.api.protocol import GenerateRequest, ToolSpec
from app.api.wire.responses_request import ResponsesRequest
from app.api.wire.responses_stream import ResponseOutput
from app.engine.engine import RequestOutput
from app.engine.sampling_params import SamplingParams
from tests.openapi_contract import validate
from tests.responses_contract import validate_event

WEATHER = ToolSpec("get_weather", None, {"type": "object", "properties": {"city": {"type": "string"}}})


def output(tool_choice: str = "auto", tools: list[ToolSpec] | None = None, tool_name: str | None = None,
           parallel: bool = True) -> ResponseOutput:
    body = ResponsesRequest(model="m", input="x", parallel_tool_calls=parallel)
    response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "background": False,
                "completed_at": None, "error": None, "incomplete_details": None, **body.wire_fields([]),
                "output": [], "usage": None}
    req = GenerateRequest("r", "m", SamplingParams(), messages=[], tools=tools or [], tool_choice=tool_choice,
                          tool_name=tool_name)
    return ResponseOutput(response, req, obfuscate=True)


def deltas(result: ResponseOutput, texts: list[str], finish_reason: str = "stop") -> list[dict]:
    events = result.start()
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        events += result.feed(RequestOutput("r", text=text, finished=last, finish_reason=finish_reason if last else None,
                                            num_prompt_tokens=5, num_output_tokens=i + 1))
    for event in events:
        validate_event(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_text_stream():
    result = output()
    events = deltas(result, ["Hel", "lo", "!"])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "Hello!"
    assert final["usage"] == {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}, "output_tokens": 3,
                              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 8}
    assert events[0]["response"]["output"] == [] and events[0]["response"]["status"] == "in_progress"
    assert all("obfuscation" in e for e in events if e["type"].endswith(".delta"))
    validate(final, "Response")


def test_cut_by_the_limit():
    events = deltas(output(), ["a", "b"], finish_reason="length")
    final = events[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["output"][0]["status"] == "incomplete"


def test_empty_answer_is_an_empty_message():
    events = deltas(output(), [""])
    (item,) = events[-1]["response"]["output"]
    assert item["type"] == "message" and item["content"][0]["text"] == ""


def test_forced_call_streams_its_arguments():
    result = output("required", [WEATHER], "get_weather")
    events = deltas(result, ['{"name": "get_', 'weather", "arguments": {"ci', 'ty": "Oslo"}', "}"])
    (call,) = events[-1]["response"]["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["status"] == "completed"
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert json.loads(streamed) == {"city": "Oslo"} == json.loads(call["arguments"])
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == call["arguments"] and done["name"] == "get_weather"


def test_forced_call_cut_short_is_a_call_with_partial_arguments():
    events = deltas(output("required", [WEATHER], "get_weather"), ['{"name": "get_weather", "arguments": {"ci'],
                    finish_reason="length")
    (call,) = events[-1]["response"]["output"]
    assert call["type"] == "function_call" and call["status"] == "incomplete" and call["arguments"] == '{"ci'
    events = deltas(output("required", [WEATHER]), ['{"name": "get_w'], finish_reason="length")
    (call,) = events[-1]["response"]["output"]
    assert call["name"] == "get_weather" and call["arguments"] == ""


def test_free_choice_text_then_calls():
    text = 'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>' \
           '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    events = deltas(output("auto", [WEATHER]), [text[:20], text[20:]])
    message, *calls = events[-1]["response"]["output"]
    assert message["content"][0]["text"].strip() == "Let me look."
    assert [json.loads(c["arguments"])["city"] for c in calls] == ["Rome", "Oslo"]
    events = deltas(output("auto", [WEATHER], parallel=False), [text])
    assert len(events[-1]["response"]["output"]) == 2  # the text and the first call only


def test_failure_mid_stream():
    result = output()
    events = result.start() + result.feed(RequestOutput("r", text="a"))
    events += result.fail(ConduitError("the replica died", 503, "server_error", None, "replica_unavailable"))
    for event in events:
        validate_event(event)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "the replica died"}
