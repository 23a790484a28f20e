"""Wire-neutral tool calling (app/api/tools.py) and fill-in-the-middle prompts (app/api/fim.py)."""

import json

import pytest

from app.api.errors import ConduitError
from app.api.fim import fim_ids
from app.api.protocol import GenerateRequest, ToolSpec
from app.api.tools import (
    AutoCallStream,
    ForcedCallStream,
    call_schema,
    chat_template_inputs,
    cut_call,
    parse_auto,
    parse_forced,
)
from app.engine.sampling_params import SamplingParams

TOOLS = [ToolSpec("get_weather", "weather", {"type": "object", "properties": {"city": {"type": "string"}}}),
         ToolSpec("get_time")]


def test_call_schema_names_each_tool_with_its_arguments():
    assert call_schema(TOOLS, "get_time")["properties"]["name"] == {"const": "get_time"}
    both = call_schema(TOOLS)["anyOf"]
    assert [o["properties"]["arguments"] for o in both] == [TOOLS[0].parameters, TOOLS[1].parameters]


def test_parse_forced_and_cut_short():
    [call] = parse_forced('{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"}) and call.id.startswith("call_")
    assert parse_forced('{"name": "get_weather", "argu') == []


@pytest.mark.parametrize("text, content, names", [
    ('Sure. <tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "Sure.", ["get_time"]),
    ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_weather", '
     '"arguments": {"city": "x"}}</tool_call>', None, ["get_time", "get_weather"]),
    ('{"name": "get_time", "parameters": {}}', None, ["get_time"]),
    ('{"name": "unknown", "arguments": {}}', '{"name": "unknown", "arguments": {}}', []),
    ("just text", "just text", []),
    ("<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),
])
def test_parse_auto(text, content, names):
    rest, calls = parse_auto(text, TOOLS)
    assert rest == content and [c.name for c in calls] == names


def test_forced_stream_passes_arguments_as_they_come():
    text = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    stream, names, args = ForcedCallStream(), [], ""
    for i in range(0, len(text), 3):
        name, more = stream.feed(text[i : i + 3], final=i + 3 >= len(text))
        names += [name] if name else []
        args += more
    assert names == ["get_weather"] and json.loads(args) == {"city": "Oslo"}


def test_auto_stream_holds_back_only_what_may_be_a_call():
    stream = AutoCallStream(TOOLS)
    out = "".join(stream.feed(piece) for piece in ["Let me ", "check <tool", '_call>{"name": "get_time", ',
                                                   '"arguments": {}}</tool_call>'])
    assert out == "Let me check "
    rest, calls = stream.finish()
    assert rest is None and [c.name for c in calls] == ["get_time"]
    plain = AutoCallStream(TOOLS)
    assert plain.feed("a < b") == "a < b" and plain.finish() == ("", [])


class _Tokenizer:
    def __init__(self, template):
        self.chat_template = template


def test_template_without_tools_gets_them_in_the_system_message():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "1", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
                {"role": "tool", "tool_call_id": "1", "content": "noon"}]
    req = GenerateRequest("r", "m", SamplingParams(), messages=messages, tools=TOOLS)
    rendered, tools = chat_template_inputs(_Tokenizer("{{ messages }}"), req)
    assert tools is None and rendered[0]["role"] == "system" and '"name": "get_weather"' in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert rendered[3] == {"role": "user", "content": "<tool_response>\nnoon\n</tool_response>"}
    native, tools = chat_template_inputs(_Tokenizer("{{ tools }} {{ m.tool_calls }}"), req)
    assert native == messages and tools[0]["function"]["name"] == "get_weather"
    req.tool_choice = "none"
    assert chat_template_inputs(_Tokenizer("{{ tools }} {{ m.tool_calls }}"), req)[1] is None


def test_fim_ids_use_the_tokenizers_own_tokens(hf_model):
    tokenizer = hf_model[1]
    pre, suf, mid = tokenizer.convert_tokens_to_ids(["<fim_prefix>", "<fim_suffix>", "<fim_middle>"])
    assert fim_ids(tokenizer, [5, 6], "x") == [pre, 5, 6, suf, *tokenizer.encode("x"), mid]
    no_fim = type("T", (), {"get_vocab": lambda self: {"a": 0}})()
    with pytest.raises(ConduitError) as err:
        fim_ids(no_fim, [1], "x")
    assert err.value.param == "suffix" and err.value.status == 400


CALL = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'


@pytest.mark.parametrize("cut, name, arguments", [
    (CALL[:2], "get_weather", ""),  # nothing of the name: the first tool
    (CALL[:14], "get_weather", ""),  # `{"name": "get_`: the first tool whose name begins so
    ('{"name": "get_t', "get_time", ""),
    ('{"name": "get_weather", "arguments": {"city', "get_weather", '{"city'),
    (CALL[:-1], "get_weather", '{"city": "Oslo"}'),  # only the call's own brace missing
])
def test_cut_call_is_a_call_with_what_was_written(cut, name, arguments):
    call = cut_call(cut, TOOLS)
    assert (call.name, call.arguments) == (name, arguments) and call.id.startswith("call_")
    assert cut_call(cut, TOOLS, name="get_time").name == "get_time"  # a named tool is that tool


@pytest.mark.parametrize("cut", [CALL[:20], CALL[:44], CALL[:-1], CALL])
def test_forced_stream_passes_on_what_a_cut_call_wrote(cut):
    stream, args = ForcedCallStream(), ""
    for i in range(0, len(cut), 4):
        args += stream.feed(cut[i : i + 4], final=i + 4 >= len(cut))[1]
    assert args == cut_call(cut, TOOLS).arguments if cut != CALL else json.loads(args) == {"city": "Oslo"}
    assert stream.whole() == (cut == CALL)
