"""Responses items: a request's `input` made into the items that are stored (each with its id, in
the shape `GET /v1/responses/{id}/input_items` returns), and a conversation's items made into the
chat messages the model's template renders (GenerateRequest.messages)."""

from __future__ import annotations

import json
import secrets

from app.api.errors import invalid

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = {"input_text", "output_text", "text"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def input_items(value: str | list[dict]) -> list[dict]:
    """The request's `input` as stored items; a 400 naming the item and field for anything else."""
    if isinstance(value, str):
        return [_message("user", value)]
    return [_item(item, f"input.{i}") for i, item in enumerate(value)]


def _item(item: dict, where: str) -> dict:
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        return _input_message(item, where)
    if kind == "function_call":
        call = {"id": _given_id(item, "fc", where), "type": "function_call", "status": "completed",
                "call_id": _text(item, "call_id", where), "name": _text(item, "name", where),
                "arguments": _text(item, "arguments", where)}
        _arguments(call["arguments"], f"{where}.arguments")
        return call
    if kind == "function_call_output":
        return {"id": _given_id(item, "fco", where), "type": "function_call_output", "status": "completed",
                "call_id": _text(item, "call_id", where), "output": _output_text(item.get("output"), where)}
    raise invalid(f"{where}: input items of type {kind!r} are not supported by this server (message, function_call "
                  "and function_call_output are)", f"{where}.type", "unsupported_parameter")


def _input_message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return _message(role, content, item.get("id"))
    if not isinstance(content, list):
        raise invalid(f"Missing required parameter: '{where}.content'.", f"{where}.content", "missing_required_parameter")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise invalid(f"{where}.content.{j}: parts of type {kind!r} are not supported by this server's text "
                          "models (input_text is)", f"{where}.content.{j}.type", "unsupported_parameter")
    return _message(role, "".join(texts), item.get("id"))


def _message(role: str, text: str, item_id: str | None = None) -> dict:
    if role == "assistant":
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"id": item_id or new_id("msg"), "type": "message", "role": role, "status": "completed",
                "content": [part]}
    return {"id": item_id or new_id("msg"), "type": "message", "role": role, "status": "completed",
            "content": [{"type": "input_text", "text": text}]}


def _given_id(item: dict, prefix: str, where: str) -> str:
    given = item.get("id")
    if given is None:
        return new_id(prefix)
    if not isinstance(given, str) or not 0 < len(given) <= 64:
        raise invalid(f"{where}.id must be a string of 1 to 64 characters", f"{where}.id")
    return given


def _text(item: dict, field: str, where: str) -> str:
    value = item.get(field)
    if not isinstance(value, str):
        raise invalid(f"Missing required parameter: '{where}.{field}'.", f"{where}.{field}", "missing_required_parameter")
    return value


def _output_text(output, where: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list) and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS for p in output):
        return "".join(str(p.get("text", "")) for p in output)
    raise invalid(f"{where}.output must be text or a list of input_text parts", f"{where}.output")


def _arguments(text: str, where: str) -> dict:
    try:
        arguments = json.loads(text)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise invalid(f"{where} must be a JSON object", where)
    return arguments


def to_messages(items: list[dict], instructions: str | None) -> list[dict]:
    """The chat messages of a conversation (transformers' format, see GenerateRequest.messages):
    `instructions` first as the system message, calls joined to the assistant turn that made them,
    each call's output as a tool message naming its function."""
    messages = [{"role": "system", "content": instructions}] if instructions is not None else []
    calls: dict[str, str] = {}  # call_id -> function name
    for item in items:
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": "".join(p.get("text", p.get("refusal", "")) for p in item["content"])})
        elif item["type"] == "function_call":
            calls[item["call_id"]] = item["name"]
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": _stored_arguments(item["arguments"])}}
            if not (messages and messages[-1]["role"] == "assistant"):
                messages.append({"role": "assistant", "content": None})
            if not messages[-1]["content"]:
                messages[-1]["content"] = None
            messages[-1].setdefault("tool_calls", []).append(call)
        else:  # function_call_output
            if item["call_id"] not in calls:
                raise invalid(f"No tool call found for function call output with call_id {item['call_id']}.", "input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "name": calls[item["call_id"]],
                             "content": item["output"]})
    return messages


def _stored_arguments(text: str) -> dict:
    """A stored call's arguments; one cut short (status incomplete) may not parse: no arguments."""
    try:
        arguments = json.loads(text)
    except ValueError:
        return {}
    return arguments if isinstance(arguments, dict) else {}
