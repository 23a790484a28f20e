"""OpenAI extras through the real server and the official `openai` SDK: logprobs (checked against a
direct forward pass of the same model), echo, fill-in-the-middle `suffix`, structured output
(`response_format`) and tool calls, whole and streamed, validated with `jsonschema` over many seeds."""

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
import torch

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

SEEDS = range(8)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "kind": {"type": "string", "enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string"}, "lat": {"type": "number"}},
                 "required": ["city", "lat"]},
    },
    "required": ["name", "age", "kind", "tags", "home"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 60}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer"}},
                                                    "required": ["zone"]}},
}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def forward_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    model, _ = hf_model
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def chat_prompt_ids(server, messages) -> list[int]:
    return httpx.post(f"{server}/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]


# logprobs, echo, suffix -------------------------------------------------------------------------
def test_completion_logprobs_match_a_forward_pass(client, hf_model, reference_greedy):
    tokenizer = hf_model[1]
    prompt = "def fibonacci(n):"
    ids = tokenizer.encode(prompt)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    out_ids = reference_greedy(ids, 8)
    ref = forward_logprobs(hf_model, ids + out_ids)
    lp = reply.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in out_ids]
    for j, token in enumerate(out_ids):
        row = ref[len(ids) - 1 + j]
        assert lp.token_logprobs[j] == pytest.approx(float(row[token]), abs=1e-4)
        best = row.topk(3).indices.tolist()
        assert {tokenizer.decode([t]) for t in best} <= set(lp.top_logprobs[j])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(8)]


def test_echo_returns_prompt_and_its_logprobs(client, hf_model):
    tokenizer = hf_model[1]
    prompt = "import os\nimport sys"
    ids = tokenizer.encode(prompt)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=1,
                                      echo=True, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = forward_logprobs(hf_model, ids)
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_streamed_starts_with_the_prompt(client):
    chunks = list(client.completions.create(model=MODEL, prompt="x = 1", max_tokens=4, temperature=0, echo=True,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].text.startswith("x = 1")


def test_chat_logprobs_whole_and_streamed(server, client, hf_model, reference_greedy):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    prompt = chat_prompt_ids(server, MESSAGES)
    out_ids = reference_greedy(prompt, 6)
    ref = forward_logprobs(hf_model, prompt + out_ids)
    for j, entry in enumerate(content):
        assert entry.token == hf_model[1].decode([out_ids[j]])
        assert entry.logprob == pytest.approx(float(ref[len(prompt) - 1 + j, out_ids[j]]), abs=1e-4)
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                logprobs=True, stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    assert all(e.top_logprobs == [] for e in streamed)


def test_suffix_fills_in_the_middle(client, hf_model, reference_greedy):
    tokenizer = hf_model[1]
    prompt, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    reply = client.completions.create(model=MODEL, prompt=prompt, suffix=suffix, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    fim = tokenizer.convert_tokens_to_ids(["<fim_prefix>", "<fim_suffix>", "<fim_middle>"])
    ids = [fim[0], *tokenizer.encode(prompt), fim[1], *tokenizer.encode(suffix), fim[2]]
    assert reply.choices[0].text == tokenizer.decode(reference_greedy(ids, 8), skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "strng"}}}}}},
     "response_format.json_schema.schema"),
    ({"messages": MESSAGES, "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": MESSAGES, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"messages": MESSAGES, "tool_choice": "required"}, "tool_choice"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools.0.function.parameters"),
])
def test_bad_extras_are_400_naming_the_field(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = httpx.post(f"{server}{path}", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# structured output -------------------------------------------------------------------------------
async def _many(async_client, seeds, max_tokens=480, **kwargs):
    return await asyncio.gather(*(async_client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=max_tokens, temperature=1.0, seed=seed, **kwargs) for seed in seeds))


def test_json_object_parses_over_many_seeds(async_client):
    replies = asyncio.run(_many(async_client, SEEDS, response_format={"type": "json_object"}))
    for reply in replies:
        assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_json_schema_validates_over_many_seeds_and_greedy(async_client, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    replies = asyncio.run(_many(async_client, SEEDS, response_format=fmt))
    replies.append(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=480, temperature=0,
                                                  response_format=fmt))
    for reply in replies:
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


def test_json_schema_streamed(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=480, seed=7, response_format=fmt, stream=True))
    jsonschema.validate(json.loads(text), PERSON)


# tool calls ----------------------------------------------------------------------------------------
def _check_call(call, names=TOOL_SCHEMAS):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])


def test_required_tool_call_over_many_seeds(async_client):
    replies = asyncio.run(_many(async_client, SEEDS, max_tokens=200, tools=[WEATHER, TIME],
                                 tool_choice="required"))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0])


def test_named_tool_call_greedy_and_sampled(async_client, client):
    named = {"type": "function", "function": {"name": "get_time"}}
    replies = asyncio.run(_many(async_client, SEEDS, max_tokens=200, tools=[WEATHER, TIME], tool_choice=named))
    replies.append(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, temperature=0,
                                                  tools=[WEATHER, TIME], tool_choice=named))
    for reply in replies:
        assert reply.choices[0].message.tool_calls[0].function.name == "get_time"
        _check_call(reply.choices[0].message.tool_calls[0], {"get_time"})


def test_forced_tool_call_streamed_in_openai_deltas(client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, seed=3, stream=True,
                                            tools=[WEATHER], tool_choice="required")
    calls, finish = {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = entry["id"] or delta.id
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), TOOL_SCHEMAS["get_weather"])


def test_auto_falls_back_to_text_and_history_with_calls_is_accepted(client):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    texts = {}
    for choice_mode in ("auto", "none"):
        reply = client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0,
                                               tools=[WEATHER], tool_choice=choice_mode, extra_body={"ignore_eos": True})
        choice = reply.choices[0]
        assert choice.message.tool_calls is None and choice.finish_reason == "length"  # the demo model writes text
        texts[choice_mode] = choice.message.content
    assert texts["auto"] != texts["none"]  # the tools were offered in the prompt only under auto
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=MODEL, messages=history, max_tokens=12, temperature=0, tools=[WEATHER], stream=True,
        extra_body={"ignore_eos": True}) if chunk.choices)
    assert text == texts["auto"]


def test_bad_tool_call_arguments_in_history_are_400(client):
    history = MESSAGES + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=history, max_tokens=4, tools=[WEATHER])
    assert err.value.body["param"] == "messages.1.tool_calls.0.function.arguments"


# the OpenAPI document --------------------------------------------------------------------------------
def test_openapi_documents_every_route_and_the_extras(server):
    doc = httpx.get(f"{server}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize"):
        assert path in doc["paths"], path
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert {"response_format", "tools", "tool_choice", "logprobs", "top_logprobs"} <= set(chat)
    assert {"echo", "suffix", "logprobs"} <= set(schemas["CompletionRequest"]["properties"])
    assert "schema" in schemas["JsonSchemaFormat"]["properties"]
