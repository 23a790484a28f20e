"""Every OpenAI route against OpenAI's published contract (tests/openapi_contract.py): the raw JSON
bodies and stream chunks of chat (plain, n > 1, logprobs, structured output, tools), completions,
embeddings, models and errors, validated with the schemas of OpenAI's OpenAPI document; and the
places where a client relies on more than the schema (a forced tool call is always a call)."""

import json

import httpx
import pytest

from tests.e2e.conftest import EMBEDDING_MODEL, MODEL
from tests.openapi_contract import validate

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 60}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer"}},
                                       "required": ["zone"]}}}
NAMED = {"type": "function", "function": {"name": "get_time"}}
GREEDY = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 16}

CHATS = {
    "plain": GREEDY,
    "stop": {**GREEDY, "stop": ["a"]},
    "n3": {**GREEDY, "n": 3, "temperature": 1, "seed": 5},
    "logprobs": {**GREEDY, "logprobs": True, "top_logprobs": 3},
    "json_schema": {**GREEDY, "max_tokens": 60, "response_format": {"type": "json_schema", "json_schema": {
        "name": "city", "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}}},
    "json_object": {**GREEDY, "max_tokens": 30, "response_format": {"type": "json_object"}},
    "tools_auto": {**GREEDY, "tools": [WEATHER, TIME]},
    "tools_required": {**GREEDY, "max_tokens": 120, "tools": [WEATHER, TIME], "tool_choice": "required"},
    "tools_named": {**GREEDY, "max_tokens": 120, "tools": [WEATHER, TIME], "tool_choice": NAMED},
    "tools_cut": {**GREEDY, "max_tokens": 12, "tools": [WEATHER], "tool_choice": "required"},
    "tools_n2_logprobs": {**GREEDY, "max_tokens": 120, "n": 2, "tools": [WEATHER], "tool_choice": "required",
                          "logprobs": True, "top_logprobs": 1},
}

def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, timeout=60)


def events(server, path: str, body: dict) -> list[dict]:
    """A stream's `data:` payloads, checking it ends with [DONE]."""
    with httpx.stream("POST", f"{server}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("case", CHATS)
def test_chat_completion_keeps_to_the_schema(server, case):
    r = post(server, "/v1/chat/completions", CHATS[case])
    assert r.status_code == 200, r.text
    validate(r.json(), "CreateChatCompletionResponse")
    assert len(r.json()["choices"]) == CHATS[case].get("n", 1)


@pytest.mark.parametrize("case", CHATS)
def test_chat_chunks_keep_to_the_schema(server, case):
    chunks = events(server, "/v1/chat/completions", {**CHATS[case], "stream_options": {"include_usage": True}})
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_assistant_message_has_refusal_null(server):
    message = post(server, "/v1/chat/completions", CHATS["plain"]).json()["choices"][0]["message"]
    assert message["refusal"] is None and message["role"] == "assistant"


def _streamed_calls(chunks: list[dict]) -> tuple[dict, str]:
    """{index: {"id", "name", "arguments"}} put together from the deltas, and the finish reason."""
    calls, finish = {}, None
    for chunk in chunks:
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(delta["index"], {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or delta.get("id")
                call["name"] += delta.get("function", {}).get("name") or ""
                call["arguments"] += delta.get("function", {}).get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return calls, finish


@pytest.mark.parametrize("cut", [1 / 8, 1 / 3, 2 / 3, -1])
@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
def test_forced_call_cut_by_max_tokens_is_still_a_call(server, cut, choice):
    """OpenAI returns a forced call cut short as a `tool_calls` entry with the partial arguments and
    finish_reason "length" (never as text), streamed or not; the arguments are what was written."""
    body = {**GREEDY, "max_tokens": 120, "tools": [WEATHER, TIME], "tool_choice": choice}
    full = post(server, "/v1/chat/completions", body).json()
    [full_call] = full["choices"][0]["message"]["tool_calls"]
    length = full["usage"]["completion_tokens"]
    body["max_tokens"] = length - 1 if cut == -1 else max(1, int(length * cut))
    whole = post(server, "/v1/chat/completions", body).json()
    validate(whole, "CreateChatCompletionResponse")
    [answer] = whole["choices"]
    assert answer["finish_reason"] == "length" and answer["message"]["content"] is None
    [call] = answer["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] in ({"get_time"} if choice == NAMED else {"get_weather", "get_time"})
    assert full_call["function"]["arguments"].startswith(call["function"]["arguments"])
    assert call["function"]["arguments"] != "" or cut != -1  # one token short: the arguments are there
    calls, finish = _streamed_calls(events(server, "/v1/chat/completions", body))
    assert finish == "length" and list(calls) == [0]
    assert (calls[0]["name"], calls[0]["arguments"]) == (call["function"]["name"], call["function"]["arguments"])


def test_forced_call_complete_is_unchanged(server):
    whole = post(server, "/v1/chat/completions", CHATS["tools_named"]).json()["choices"][0]
    assert whole["finish_reason"] == "tool_calls"
    arguments = json.loads(whole["message"]["tool_calls"][0]["function"]["arguments"])
    calls, finish = _streamed_calls(events(server, "/v1/chat/completions", CHATS["tools_named"]))
    assert finish == "tool_calls" and json.loads(calls[0]["arguments"]) == arguments


COMPLETIONS = {
    "plain": {"model": MODEL, "prompt": "alpha beta", "max_tokens": 8, "temperature": 0},
    "n2": {"model": MODEL, "prompt": "alpha beta", "max_tokens": 8, "n": 2, "seed": 1},
    "logprobs_echo": {"model": MODEL, "prompt": "alpha beta", "max_tokens": 8, "logprobs": 2, "echo": True},
    "token_ids": {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, "logprobs": 0},
    "suffix": {"model": MODEL, "prompt": "def add(a, b):", "suffix": "\n\nprint(add(1, 2))", "max_tokens": 8},
}


@pytest.mark.parametrize("case", COMPLETIONS)
def test_completion_and_its_chunks_keep_to_the_schema(server, case):
    r = post(server, "/v1/completions", COMPLETIONS[case])
    assert r.status_code == 200, r.text
    validate(r.json(), "CreateCompletionResponse")
    chunks = events(server, "/v1/completions", {**COMPLETIONS[case], "stream_options": {"include_usage": True}})
    for chunk in chunks:
        validate(chunk, "CreateCompletionResponse")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("body", [
    {"input": "one sentence"},
    {"input": ["two", "sentences"], "encoding_format": "base64"},
    {"input": [[101, 2000, 102]], "dimensions": 128},
], ids=["float", "base64", "token_ids"])
def test_embeddings_keep_to_the_schema(server, body):
    r = post(server, "/v1/embeddings", {"model": EMBEDDING_MODEL, **body})
    assert r.status_code == 200, r.text
    validate(r.json(), "CreateEmbeddingResponse")


def test_models_keep_to_the_schema(server):
    listing = httpx.get(f"{server}/v1/models").json()
    validate(listing, "ListModelsResponse")
    assert MODEL in {m["id"] for m in listing["data"]}
    validate(httpx.get(f"{server}/v1/models/{MODEL}").json(), "Model")


BAD = [
    ("/v1/chat/completions", {"model": "no-such-model", "messages": MESSAGES}, 404),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "bogus": 1}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "temperature": "hot"}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 100_000}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": None}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tool_choice": "required"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400),
    ("/v1/embeddings", {"model": EMBEDDING_MODEL, "input": "x", "dimensions": 7}, 400),
    ("/v1/embeddings", {"model": "no-such-model", "input": "x"}, 404),
]


@pytest.mark.parametrize("path, body, status", BAD)
def test_errors_keep_to_the_schema(server, path, body, status):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    validate(r.json(), "ErrorResponse")


@pytest.mark.parametrize("method, path, content, status", [
    ("GET", "/v1/models/no-such-model", None, 404),
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", b'{"model": "\xff"}', 400),  # not UTF-8
    ("GET", "/v1/chat/completions", None, 405),
    ("POST", "/v1/no-such-route", b"{}", 404),
])
def test_errors_outside_a_route_keep_to_the_schema(server, method, path, content, status):
    r = httpx.request(method, f"{server}{path}", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    validate(r.json(), "ErrorResponse")


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "system"}, {"role": "tool", "tool_call_id": "c"}])
def test_message_without_content_is_400_naming_it(server, message):
    """As OpenAI: only an assistant message that makes tool calls may go without `content`."""
    r = post(server, "/v1/chat/completions", {**GREEDY, "messages": [message]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text
