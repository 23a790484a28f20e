"""OpenAI's Responses API through the official `openai` SDK against the shared app (its store: the
default embedded SQLite): create (plain, json_schema, forced call, a 3-turn previous_response_id
chain), stream, retrieve, delete, input items, background + poll + cancel; greedy text equal to the
chat route's; every object and stream event checked against OpenAI's OpenAPI document."""

import json
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.openapi_contract import validate
from tests.responses_contract import validate_event

pytestmark = pytest.mark.e2e
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}
# a schema whose every answer is short: the tiny random model then ends (status completed) by itself
VERDICT = {"type": "json_schema", "name": "verdict", "strict": True,
           "schema": {"type": "object", "properties": {"verdict": {"enum": ["yes", "no"]}}, "required": ["verdict"],
                      "additionalProperties": False}}


def raw(server: str, path: str, method: str = "GET", **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server}/v1/responses{path}", timeout=60, **kwargs)


def test_plain_create_retrieve_delete(client, server):
    response = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=8, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    assert response.output[0].type == "message" and response.output_text
    assert response.usage.input_tokens > 0 and response.usage.output_tokens <= 8
    body = raw(server, f"/{response.id}").json()
    validate(body, "Response")
    assert body["output"] == response.model_dump(mode="json", exclude_unset=True)["output"]
    assert client.responses.retrieve(response.id).output_text == response.output_text
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


def test_cut_by_the_limit_is_incomplete(client):
    response = client.responses.create(model=MODEL, input="Tell me a long story", max_output_tokens=3,
                                       temperature=0, store=False)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3
    with pytest.raises(openai.NotFoundError):  # store=False: nothing kept
        client.responses.retrieve(response.id)


def test_greedy_text_equals_chat(client):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Tell me about trains"}]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                                 *conversation], max_tokens=16, temperature=0)
    response = client.responses.create(model=MODEL, instructions="Be brief.", input=conversation,
                                       max_output_tokens=16, temperature=0)
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens


def test_json_schema_output(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    response = client.responses.create(
        model=MODEL, input="A person as JSON", max_output_tokens=60, temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    value = json.loads(response.output_text)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    assert response.text.format.type == "json_schema"


def test_forced_function_call_and_its_result(client, server):
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"},
                                    max_output_tokens=60, temperature=0)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments)["city"] in ("Paris", "Oslo", "Rome")
    validate(raw(server, f"/{first.id}").json(), "Response")
    second = client.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER],
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "Sunny, 21 C"}],
                                     max_output_tokens=8, temperature=0)
    assert second.output[0].type == "message"
    assert second.usage.input_tokens > first.usage.input_tokens  # the earlier turn counts as input


def test_required_call_cut_short_is_still_a_call(client):
    response = client.responses.create(model=MODEL, input="Weather?", tools=[WEATHER], tool_choice="required",
                                       max_output_tokens=4, temperature=0)
    assert response.status == "incomplete"
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "incomplete"


def test_chain_of_three_turns(client, server):
    turns, previous = [], None
    for text in ("My name is Ada.", "I like trains.", "What do you know about me?"):
        response = client.responses.create(model=MODEL, input=text, previous_response_id=previous,
                                           max_output_tokens=6, temperature=0)
        turns.append(response)
        previous = response.id
    # the third turn saw the whole conversation: the same text as chat given all of it
    history = []
    for text, response in zip(("My name is Ada.", "I like trains."), turns):
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": response.output_text}]
    chat = client.chat.completions.create(
        model=MODEL, messages=[*history, {"role": "user", "content": "What do you know about me?"}],
        max_tokens=6, temperature=0)
    assert turns[2].output_text == chat.choices[0].message.content
    assert turns[2].usage.input_tokens == chat.usage.prompt_tokens
    assert turns[2].previous_response_id == turns[1].id
    # input items: each response's own input, newest first by default
    items = client.responses.input_items.list(turns[2].id)
    assert [i.content[0].text for i in items.data] == ["What do you know about me?"]
    page = raw(server, f"/{turns[2].id}/input_items").json()
    validate(page, "ResponseItemList")


def test_input_items_paginate(client):
    texts = [f"message {i}" for i in range(7)]
    response = client.responses.create(model=MODEL, input=[{"role": "user", "content": t} for t in texts],
                                       max_output_tokens=2, temperature=0)
    first = client.responses.input_items.list(response.id, limit=3, order="asc")
    assert [i.content[0].text for i in first.data] == texts[:3] and first.has_more
    every = [i.content[0].text for i in client.responses.input_items.list(response.id, limit=2, order="asc")]
    assert every == texts  # the SDK's auto-paging follows `after`
    newest = client.responses.input_items.list(response.id, limit=2)
    assert [i.content[0].text for i in newest.data] == texts[:-3:-1]


def test_stream_events(client, server):
    ask = {"model": MODEL, "input": "Is it?", "max_output_tokens": 30, "temperature": 0, "text": {"format": VERDICT}}
    with client.responses.stream(**ask) as stream:  # the SDK's helper needs response.completed
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    whole = client.responses.create(**ask)
    assert deltas == final.output_text == whole.output_text and json.loads(deltas)["verdict"] in ("yes", "no")
    assert client.responses.retrieve(final.id).output_text == final.output_text  # stored when it ended
    with httpx.stream("POST", f"{server}/v1/responses", timeout=60,
                      json={"model": MODEL, "input": "Hi", "max_output_tokens": 4, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                validate_event(event)


def test_streamed_function_call(client, server):
    with client.responses.stream(model=MODEL, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=60, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    (call,) = final.output
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == call.arguments and json.loads(arguments)["city"] in ("Paris", "Oslo", "Rome")


def test_background_poll_and_cancel(client):
    queued = client.responses.create(model=MODEL, input="Hello", max_output_tokens=8, temperature=0, background=True)
    assert queued.status == "queued" and queued.background
    deadline = time.monotonic() + 60
    while (done := client.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    whole = client.responses.create(model=MODEL, input="Hello", max_output_tokens=8, temperature=0)
    assert done.status == whole.status and done.output_text == whole.output_text
    # a long one, cancelled while it runs
    running = client.responses.create(model=MODEL, input="Hello", max_output_tokens=400, temperature=0,
                                      background=True)
    cancelled = client.responses.cancel(running.id)
    assert cancelled.status == "cancelled"
    time.sleep(1)
    assert client.responses.retrieve(running.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):  # an ended one cannot be cancelled
        client.responses.cancel(done.id)
