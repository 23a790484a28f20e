"""The Anthropic Messages endpoint through the official `anthropic` SDK. One engine, many mouths:
greedy output must equal the OpenAI chat route's for the same messages."""

import asyncio
import json
import re

import anthropic
import httpx
import jsonschema
import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e
GREEDY = {"temperature": 0}  # this SDK version has no temperature argument: it goes in the body
SYSTEM = "Be brief."
TURNS = [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": [{"type": "text", "text": "Hi. "}, {"type": "text", "text": "What now?"}]},
    {"role": "user", "content": [{"type": "text", "text": "Tell me a story"}]},
]
# the same conversation in OpenAI's format
OPENAI_MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi. What now?"},
    {"role": "user", "content": "Tell me a story"},
]


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server, api_key="x", max_retries=0)


@pytest.fixture
def async_claude(server):
    return anthropic.AsyncAnthropic(base_url=server, api_key="x", max_retries=0)


def openai_greedy(client, max_tokens: int):
    return client.chat.completions.create(model=MODEL, messages=OPENAI_MESSAGES, max_tokens=max_tokens, temperature=0)


def test_message_equals_openai_chat_greedy(claude, client):
    msg = claude.messages.create(model=MODEL, system=SYSTEM, messages=TURNS, max_tokens=12, extra_body=GREEDY,
                                 metadata={"user_id": "u-1"}, extra_headers={"x-request-id": "req-abc"})
    ref = openai_greedy(client, 12)
    assert (msg.id, msg.type, msg.role, msg.model) == ("msg_req-abc", "message", "assistant", MODEL)
    assert len(msg.content) == 1 and msg.content[0].type == "text"
    assert msg.content[0].text == ref.choices[0].message.content and msg.content[0].text
    assert msg.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[ref.choices[0].finish_reason]
    assert msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)
    assert msg.container is None and msg.stop_details is None


def test_system_as_text_blocks_and_raw_headers(server, claude):
    blocks = [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief.", "cache_control": {"type": "ephemeral"}}]
    as_blocks = claude.messages.create(model=MODEL, system=blocks, messages=TURNS, max_tokens=8, extra_body=GREEDY)
    as_string = claude.messages.create(model=MODEL, system=SYSTEM, messages=TURNS, max_tokens=8, extra_body=GREEDY)
    assert as_blocks.content == as_string.content and as_blocks.usage == as_string.usage
    # what other Anthropic clients send: x-api-key and anthropic-version headers
    headers = {"x-api-key": "any", "anthropic-version": "2023-06-01"}
    body = {"model": MODEL, "system": SYSTEM, "messages": TURNS, "max_tokens": 8, "temperature": 0}
    raw = httpx.post(f"{server}/v1/messages", json=body, headers=headers, timeout=30)
    assert raw.status_code == 200 and raw.json()["content"] == [{"type": "text", "text": as_string.content[0].text}]


def test_assistant_prefill_is_continued(claude, hf_model, reference_greedy):
    _, tokenizer = hf_model
    turns = [{"role": "user", "content": "Pick one: (A) or (B)"}, {"role": "assistant", "content": "The answer is ("}]
    msg = claude.messages.create(model=MODEL, messages=turns, max_tokens=8, extra_body=GREEDY)
    rendered = tokenizer.apply_chat_template(turns, tokenize=False, continue_final_message=True)
    assert rendered.endswith("The answer is (")  # the turn is left open, no new assistant header
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    expected = reference_greedy(ids, 8, ignore_eos=False)
    assert msg.content[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (len(ids), len(expected))
    assert claude.messages.count_tokens(model=MODEL, messages=turns).input_tokens == len(ids)


def test_top_k_and_top_p_reach_the_sampler(claude):
    greedy = claude.messages.create(model=MODEL, messages=TURNS, max_tokens=10, extra_body=GREEDY).content[0].text
    for only_top_token in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = claude.messages.create(model=MODEL, messages=TURNS, max_tokens=10,
                                         extra_body={"temperature": 1.0, **only_top_token})
        assert sampled.content[0].text == greedy, only_top_token


def test_async_concurrent_messages(async_claude, claude):
    lengths = [4, 9, 14, 19]
    expected = [claude.messages.create(model=MODEL, messages=TURNS, max_tokens=n, extra_body=GREEDY) for n in lengths]

    async def all_at_once():
        return await asyncio.gather(*(
            async_claude.messages.create(model=MODEL, messages=TURNS, max_tokens=n, extra_body=GREEDY) for n in lengths
        ))

    for got, want in zip(asyncio.run(all_at_once()), expected):
        assert got.content == want.content and got.usage == want.usage and got.stop_reason == want.stop_reason


def test_stream_helper_accumulates_the_same_message(claude):
    whole = claude.messages.create(model=MODEL, system=SYSTEM, messages=TURNS, max_tokens=20, extra_body=GREEDY)
    with claude.messages.stream(model=MODEL, system=SYSTEM, messages=TURNS, max_tokens=20, extra_body=GREEDY) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == whole.content[0].text
    assert [(b.type, b.text) for b in final.content] == [("text", whole.content[0].text)]
    assert final.usage == whole.usage
    assert (final.stop_reason, final.stop_sequence, final.model, final.role) == (whole.stop_reason, None, MODEL, "assistant")
    assert final.id.startswith("msg_")


def test_create_stream_event_sequence(claude):
    events = list(claude.messages.create(model=MODEL, messages=TURNS, max_tokens=16, extra_body=GREEDY, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    start = events[0].message
    assert (start.type, start.role, start.model, start.content) == ("message", "assistant", MODEL, [])
    assert start.stop_reason is None
    assert start.usage.input_tokens > 0
    assert events[1].index == 0 and events[1].content_block.type == "text" and events[1].content_block.text == ""
    assert all(e.index == 0 and e.delta.type == "text_delta" and e.delta.text for e in events[2:-3])
    delta = events[-2]
    assert (delta.delta.stop_reason, delta.delta.stop_sequence, delta.usage.output_tokens) == ("max_tokens", None, 16)
    assert delta.usage.input_tokens == start.usage.input_tokens


def test_raw_stream_wire_format(server):
    body = {"model": MODEL, "messages": TURNS, "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{server}/v1/messages", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in r.read().decode().split("\n\n") if f]
    names = []
    for frame in frames:
        event_line, data_line = frame.split("\n")
        name = event_line.removeprefix("event: ")
        assert json.loads(data_line.removeprefix("data: "))["type"] == name
        names.append(name)
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) <= {"content_block_delta"}


def test_stop_sequences(claude):
    base = claude.messages.create(model=MODEL, messages=TURNS, max_tokens=30, extra_body=GREEDY).content[0].text
    stop = base[10:14]
    msg = claude.messages.create(model=MODEL, messages=TURNS, max_tokens=30, extra_body=GREEDY,
                                 stop_sequences=["never-in-output", stop])
    assert msg.content[0].text == base[: base.index(stop)]
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", stop)
    with claude.messages.stream(model=MODEL, messages=TURNS, max_tokens=30, extra_body=GREEDY, stop_sequences=[stop]) as s:
        assert "".join(s.text_stream) == msg.content[0].text
        final = s.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


def test_count_tokens_equals_openai_prompt_tokens(claude, client):
    counted = claude.messages.count_tokens(model=MODEL, system=SYSTEM, messages=TURNS)
    assert counted.input_tokens == openai_greedy(client, 1).usage.prompt_tokens
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="no-such-model", messages=TURNS)


def test_sdk_raises_its_own_errors(claude):
    with pytest.raises(anthropic.NotFoundError, match="no-such-model") as e:
        claude.messages.create(model="no-such-model", messages=TURNS, max_tokens=4)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="no-such-model", messages=TURNS, max_tokens=4, stream=True)
    with pytest.raises(anthropic.BadRequestError, match="maximum context length"):
        claude.messages.create(model=MODEL, messages=[{"role": "user", "content": "alpha " * 600}], max_tokens=4)
    with pytest.raises(anthropic.BadRequestError, match="does not support `thinking`"):
        claude.messages.create(model=MODEL, messages=TURNS, max_tokens=4,
                               thinking={"type": "enabled", "budget_tokens": 1024})
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        claude.messages.create(model=MODEL, messages=TURNS, max_tokens=4, extra_body={"temperature": 1.5})


def message_body(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **fields}


@pytest.mark.parametrize(
    "body,status,names",
    [
        ('{"model": ', 400, "JSON"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens"),
        (message_body(max_tokens=0), 400, "max_tokens"),
        (message_body(messages=[]), 400, "messages"),
        (message_body(messages=[{"role": "tool", "content": "x"}]), 400, "messages.0.role"),
        (message_body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]), 400,
         "messages.0.content.0: this server does not support `image` content blocks"),
        (message_body(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
        (message_body(system=[{"type": "text", "text": "x", "citations": []}]), 400, "system.0.citations"),
        (message_body(top_k=-1), 400, "top_k"),
        (message_body(stop_sequences=[""]), 400, "stop_sequences.0"),
        (message_body(bogus_field=1), 400, "bogus_field"),
        (message_body(max_tokens=100000), 400, "max_tokens"),
        (message_body(model="no-such-model"), 404, "no-such-model"),
    ],
)
def test_bad_input_gets_anthropic_error(server, body, status, names):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server}/v1/messages", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"type", "error"} and err["type"] == "error" and set(err["error"]) == {"type", "message"}
    assert err["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert names in err["error"]["message"]


def test_oversized_body_gets_anthropic_413(server):
    r = httpx.post(f"{server}/v1/messages", content=b"x" * 1_100_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


# tools and structured output ---------------------------------------------------------------------
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "integer"}},
                                              "required": ["zone"]}}
TOOL_SCHEMAS = {t["name"]: t["input_schema"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SAMPLED = 12


def block_values(content) -> list[tuple]:
    """What the blocks say, without the per-call tool_use ids."""
    return [(b.type, b.text) if b.type == "text" else (b.type, b.name, b.input) for b in content]


def check_tool_use(block, names=TOOL_SCHEMAS):
    assert block.type == "tool_use" and block.id.startswith("toolu_") and block.name in names
    jsonschema.validate(block.input, TOOL_SCHEMAS[block.name])


def test_forced_tool_use_validates_over_many_samples(async_claude):
    choices = [({"type": "any"}, TOOL_SCHEMAS), ({"type": "tool", "name": "get_time"}, {"get_time"})]

    async def sampled():  # temperature 1: a different call each time
        return await asyncio.gather(*(async_claude.messages.create(
            model=MODEL, messages=ASK, max_tokens=256, tools=[WEATHER, TIME], tool_choice=choice)
            for choice, _ in choices for _ in range(SAMPLED)))

    replies = asyncio.run(sampled())
    for i, msg in enumerate(replies):
        assert msg.stop_reason == "tool_use" and msg.stop_sequence is None and len(msg.content) == 1
        check_tool_use(msg.content[0], choices[i // SAMPLED][1])
    assert len({json.dumps(m.content[0].input) for m in replies}) > 1


def test_greedy_tool_use_equals_openai_tool_call(claude, client):
    msg = claude.messages.create(model=MODEL, messages=ASK, max_tokens=256, tools=[WEATHER], extra_body=GREEDY,
                                 tool_choice={"type": "tool", "name": "get_weather"})
    openai_tool = {"type": "function", "function": {"name": "get_weather", "description": WEATHER["description"],
                                                    "parameters": WEATHER["input_schema"]}}
    ref = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=256, temperature=0, tools=[openai_tool],
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = ref.choices[0].message.tool_calls[0]
    assert (msg.content[0].name, msg.content[0].input) == (call.function.name, json.loads(call.function.arguments))
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)


def test_tool_use_streamed_as_input_json_deltas(claude):
    kwargs = dict(model=MODEL, messages=ASK, max_tokens=256, tools=[WEATHER], tool_choice={"type": "any"},
                  extra_body=GREEDY)
    whole = claude.messages.create(**kwargs)
    events = list(claude.messages.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[1].content_block
    assert (start.type, start.name, start.input) == ("tool_use", "get_weather", {}) and start.id.startswith("toolu_")
    deltas = [e.delta for e in events[2:-3]]
    assert deltas and all(d.type == "input_json_delta" for d in deltas)
    assert json.loads("".join(d.partial_json for d in deltas)) == whole.content[0].input
    assert events[-2].delta.stop_reason == "tool_use"
    with claude.messages.stream(**kwargs) as s:
        final = s.get_final_message()
    assert final.content[0].input == whole.content[0].input and final.stop_reason == "tool_use"


def test_tool_history_round_trip_and_tool_choice_none(claude):
    first = claude.messages.create(model=MODEL, messages=ASK, max_tokens=256, tools=[WEATHER], tool_choice={"type": "any"})
    history = ASK + [
        {"role": "assistant", "content": first.content},  # the SDK's own blocks, sent back as they are
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[0].id, "content": "21 C"},
                                     {"type": "text", "text": "Thanks"}]},
    ]
    with_tools = claude.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER]).input_tokens
    without = claude.messages.count_tokens(model=MODEL, messages=history).input_tokens
    declined = claude.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER], tool_choice={"type": "none"})
    assert with_tools > without == declined.input_tokens  # tools are described in the prompt unless declined
    for choice in ({"type": "auto"}, {"type": "none"}):
        reply = claude.messages.create(model=MODEL, messages=history, max_tokens=12, tools=[WEATHER],
                                       tool_choice=choice, extra_body=GREEDY)
        assert reply.usage.input_tokens == (without if choice["type"] == "none" else with_tools)
        assert reply.stop_reason in ("max_tokens", "end_turn", "tool_use")
        for block in reply.content:
            if block.type == "tool_use":
                check_tool_use(block)
        with claude.messages.stream(model=MODEL, messages=history, max_tokens=12, tools=[WEATHER],
                                    tool_choice=choice, extra_body=GREEDY) as s:
            streamed = s.get_final_message()
        assert block_values(streamed.content) == block_values(reply.content)
        assert streamed.stop_reason == reply.stop_reason


def test_output_config_json_schema(claude):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    msg = claude.messages.create(model=MODEL, messages=ASK, max_tokens=200,
                                 output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(msg.content[0].text), schema)
    assert msg.stop_reason == "end_turn"


def test_sdk_parse_and_stream_with_a_pydantic_output_format(claude):
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    parsed = claude.messages.parse(model=MODEL, messages=ASK, max_tokens=200, output_format=Person)
    assert isinstance(parsed.parsed_output, Person)
    with claude.messages.stream(model=MODEL, messages=ASK, max_tokens=200, output_format=Person) as s:
        assert isinstance(s.get_final_message().parsed_output, Person)


@pytest.mark.parametrize(
    "fields,names",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
        ({"tool_choice": {"type": "any"}}, "tool_choice needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, "tool_choice"),
        ({"tools": [{"name": "f", "input_schema": {"type": 3}}]}, "tools.0.input_schema"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "does not support `web_search_20250305`"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
         "messages.0: tool_use blocks belong in assistant messages"),
        ({"output_config": {"effort": "high"}}, "output_config.effort"),
    ],
)
def test_bad_tool_fields_are_400(claude, fields, names):
    kwargs = {"model": MODEL, "messages": ASK, "max_tokens": 4, **fields}
    with pytest.raises(anthropic.BadRequestError, match=re.escape(names)):
        claude.messages.create(**kwargs)


def test_openapi_documents_the_messages_routes(server):
    doc = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/messages", "/v1/messages/count_tokens"} <= set(doc["paths"])
    ref = doc["paths"]["/v1/messages"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    fields = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    accepted = {"max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "tools", "tool_choice", "output_config"}
    assert accepted <= set(fields)
    assert "thinking" not in fields  # refused, so not documented
