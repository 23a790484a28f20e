"""Tool calling, wire-neutral: the grammar a forced call is decoded under, the parsing of a
model's text into calls, call ids, and a stream splitter. The OpenAI and Anthropic adapters
translate their own `tools` / `tool_choice` into `GenerateRequest.tools` and use these.

A call is written as JSON `{"name": ..., "arguments": {...}}`. Forced calls (`required` or a
named tool) are that object alone, constrained by guided decoding; under `auto` a model writes
Hermes-style `<tool_call>{...}</tool_call>` blocks (what the chat template asks for), or answers
with one bare JSON object naming a tool, and anything else is plain text."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass

from app.api.errors import invalid
from app.api.protocol import GenerateRequest, ToolSpec
from app.engine.sampling_params import GuidedDecoding
from app.engine.schema_limits import SchemaError, check_limits

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_ID_CHARS = string.ascii_letters + string.digits


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (what OpenAI sends; Anthropic parses it)


def new_call_id(prefix: str = "call_") -> str:
    return prefix + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


def call_schema(tools: list[ToolSpec], name: str | None = None) -> dict:
    """JSON Schema of one call of `name` (or of any of `tools`): its arguments valid for that
    tool's parameters."""
    chosen = [t for t in tools if name is None or t.name == name]
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
        }
        for t in chosen
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def forced(req: GenerateRequest) -> bool:
    return bool(req.tools) and (req.tool_choice == "required" or req.tool_name is not None)


def constrain(req: GenerateRequest) -> None:
    """A forced call: decode under the call's grammar (called once the request is prepared). Each
    tool's schema passed the caps; their union is checked too (a 400 naming `tools`)."""
    if forced(req):
        schema = call_schema(req.tools, req.tool_name)
        try:
            check_limits(schema)
        except SchemaError as e:
            raise invalid(f"tools: the forced call's schema (all the tools together): {e}", "tools") from None
        req.sampling.guided = GuidedDecoding(schema, param="tools")


def parse_forced(text: str, id_prefix: str = "call_") -> list[ToolCall]:
    """The output of a forced call (grammar-made, so it is the call object unless cut short)."""
    call = _as_call(text, None)
    return [ToolCall(new_call_id(id_prefix), *call)] if call else []


def cut_call(text: str, tools: list[ToolSpec], name: str | None = None, id_prefix: str = "call_") -> ToolCall:
    """A forced call cut short (max_tokens, a stop string), as a call all the same, as OpenAI returns
    it: its name, and its arguments as far as they were written. A name cut short is the named tool,
    else the first of `tools` whose name begins with what was written (the grammar allows no other)."""
    head = text[len(ForcedCallStream.HEAD):]
    written, marker, arguments = head.partition(ForcedCallStream.ARGS)
    if not marker:
        written, arguments = written.partition('"')[0], ""
        name = name or next((t.name for t in tools if t.name.startswith(written)), tools[0].name)
    return ToolCall(new_call_id(id_prefix), name or written, arguments)


def parse_auto(text: str, tools: list[ToolSpec], id_prefix: str = "call_") -> tuple[str | None, list[ToolCall]]:
    """(remaining text or None, calls) from a model that was free to call `tools` or not."""
    names = {t.name for t in tools}
    calls, rest, pos = [], [], 0
    while (start := text.find(CALL_OPEN, pos)) != -1:
        end = text.find(CALL_CLOSE, start)
        call = _as_call(text[start + len(CALL_OPEN) : end if end != -1 else len(text)], names)
        if call is None:
            break
        rest.append(text[pos:start])
        calls.append(ToolCall(new_call_id(id_prefix), *call))
        pos = len(text) if end == -1 else end + len(CALL_CLOSE)
    rest.append(text[pos:])
    if not calls and (call := _as_call(text, names)):
        return None, [ToolCall(new_call_id(id_prefix), *call)]
    content = "".join(rest).strip()
    return (content or None) if calls else text, calls


def _as_call(text: str, names: set[str] | None) -> tuple[str, str] | None:
    """(name, arguments JSON) when `text` is one JSON call object (of a tool in `names`)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if (names is not None and value["name"] not in names) or not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


class ForcedCallStream:
    """Turns a forced call's text, as it streams, into (name once, then argument fragments): the
    grammar writes it compactly as `{"name": "N", "arguments": ARGS}`, so ARGS can be passed on as
    it arrives, holding back only the closing brace."""

    HEAD = '{"name": "'
    ARGS = '", "arguments": '

    def __init__(self):
        self.text = ""
        self.name: str | None = None
        self.sent = 0  # chars of ARGS passed on

    def whole(self) -> bool:
        """The call was written to its end (not cut short)."""
        return _as_call(self.text, None) is not None

    def feed(self, delta: str, final: bool) -> tuple[str | None, str]:
        """(the call's name the first time it is known, else None; new argument text)."""
        self.text += delta
        new_name = None
        if self.name is None:
            at = self.text.find(self.ARGS)
            if at == -1:
                return None, ""
            self.name = new_name = self.text[len(self.HEAD) : at]
            self.args_start = at + len(self.ARGS)
        # the call's closing brace is held back, and dropped at the end of a whole call (one cut
        # short may end in its arguments' own brace)
        end = len(self.text) - 1 if final and self.whole() else len(self.text) - (not final)
        args = self.text[self.args_start + self.sent : max(end, self.args_start + self.sent)]
        self.sent += len(args)
        return new_name, args


class AutoCallStream:
    """Streams a free answer's text, holding back what may be a tool call (a `<tool_call>` block,
    or an answer that opens with `{`) until the end, where `parse_auto` decides."""

    def __init__(self, tools: list[ToolSpec], id_prefix: str = "call_"):
        self.tools, self.id_prefix = tools, id_prefix
        self.held = ""
        self.streamed = False  # some text was already passed on

    def feed(self, delta: str) -> str:
        """Text that is surely not part of a call."""
        self.held += delta
        if not self.streamed and self.held.lstrip().startswith("{"):
            return ""
        at = self.held.find(CALL_OPEN)
        if at == -1:  # keep a tail that could still become CALL_OPEN
            at = next((i for i in range(max(0, len(self.held) - len(CALL_OPEN) + 1), len(self.held))
                       if CALL_OPEN.startswith(self.held[i:])), len(self.held))
        out, self.held = self.held[:at], self.held[at:]
        if out.strip():
            self.streamed = True
        return out

    def finish(self) -> tuple[str | None, list[ToolCall]]:
        """(the rest of the text, calls) once the output is complete."""
        return parse_auto(self.held, self.tools, self.id_prefix)


# the prompt ------------------------------------------------------------------------------------
def chat_template_inputs(tokenizer, req: GenerateRequest) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for `apply_chat_template`. A template that knows tools gets them as they
    are; for one that does not, the tools are described in the system message and calls/results in
    the history become Hermes-style text, so any chat model can be offered tools."""
    tools = [_hf_tool(t) for t in req.tools] if req.tools and req.tool_choice != "none" else None
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if "tools" in template and "tool_calls" in template:
        return req.messages, tools
    messages = [_as_text_message(m) for m in req.messages]
    if tools:
        intro = _tools_intro(tools)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + intro}
        else:
            messages.insert(0, {"role": "system", "content": intro})
    return messages, None


def _hf_tool(tool: ToolSpec) -> dict:
    function = {"name": tool.name, "parameters": tool.parameters}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _tools_intro(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        f"You may call one or more functions to answer. The functions:\n<tools>\n{listing}\n</tools>\n"
        f'To call one, answer with {CALL_OPEN}{{"name": <function name>, "arguments": <JSON object>}}{CALL_CLOSE}'
    )


def _as_text_message(message: dict) -> dict:
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
    calls = message.get("tool_calls")
    if not calls:
        return message
    text = "".join(
        CALL_OPEN + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}) + CALL_CLOSE
        for c in calls
    )
    return {"role": message["role"], "content": (message.get("content") or "") + text}
