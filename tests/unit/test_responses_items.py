"""Responses input items (app/api/wire/responses_items.py) and request checks: what is stored, the
chat messages a conversation becomes, and a 400 naming the field for everything not implemented."""

import pytest
from pydantic import ValidationError

from app.api.errors import ConduitError
from app.api.wire.responses_items import input_items, to_messages
from app.api.wire.responses_request import ResponsesRequest


def test_a_string_is_one_user_message():
    (item,) = input_items("Hello")
    assert item["type"] == "message" and item["role"] == "user" and item["id"].startswith("msg_")
    assert item["content"] == [{"type": "input_text", "text": "Hello"}]


def test_a_conversation_with_calls_becomes_chat_messages():
    items = input_items([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text", "text": "Oslo?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me see.",
                                                              "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
    ])
    assert to_messages(items, "Answer in English.") == [
        {"role": "system", "content": "Answer in English."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Let me see.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "Sunny"},
    ]


def test_calls_without_text_open_an_assistant_turn():
    items = input_items([{"role": "user", "content": "x"},
                         {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}])
    assert to_messages(items, None)[-1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]}


@pytest.mark.parametrize("item, param", [
    ({"type": "reasoning", "summary": []}, "input.0.type"),
    ({"type": "item_reference", "id": "msg_1"}, "input.0.type"),
    ({"type": "web_search_call"}, "input.0.type"),
    ({"foo": "bar"}, "input.0.type"),
    ({"role": "robot", "content": "x"}, "input.0.role"),
    ({"role": "user"}, "input.0.content"),
    ({"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}, "input.0.content.0.type"),
    ({"role": "user", "content": ["just a string"]}, "input.0.content.0.type"),
    ({"type": "function_call", "name": "f", "arguments": "{}"}, "input.0.call_id"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}, "input.0.arguments"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{", "id": 5}, "input.0.id"),
    ({"type": "function_call_output", "call_id": "c", "output": {"x": 1}}, "input.0.output"),
])
def test_unknown_or_malformed_items_are_400s_naming_them(item, param):
    with pytest.raises(ConduitError) as raised:
        input_items([item])
    assert raised.value.status == 400 and raised.value.param == param


def test_an_output_for_no_call_is_a_400():
    items = input_items([{"type": "function_call_output", "call_id": "nope", "output": "x"}])
    with pytest.raises(ConduitError) as raised:
        to_messages(items, None)
    assert raised.value.status == 400 and "nope" in raised.value.message


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools.0.name"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"background": True, "store": False}, "store"),
    ({"background": True, "stream": True}, "stream"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"tool_choice": {"type": "web_search_preview"}, "tools": [{"type": "function", "name": "f"}]}, "tool_choice"),
])
def test_what_is_not_implemented_is_a_400_naming_it(fields, param):
    body = ResponsesRequest(model="m", input="x", **fields)
    with pytest.raises(ConduitError) as raised:
        body.check()
        tools = body.function_tools()
        body.to_internal("r", [], tools)
    assert raised.value.status == 400 and raised.value.param == param


@pytest.mark.parametrize("fields", [{"truncation": "auto"}, {"service_tier": "flex"}, {"frequency_penalty": 1},
                                    {"text": {"verbosity": "high"}}, {"max_output_tokens": 0}])
def test_unimplemented_values_fail_validation(fields):
    with pytest.raises(ValidationError):
        ResponsesRequest(model="m", input="x", **fields)
