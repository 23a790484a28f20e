"""Anthropic Messages wire format: request schemas, their translation into the internal
`GenerateRequest`, the message object and stream events built from engine outputs, and the
routes (`routes()`). Errors take Anthropic's shape on every `/v1/messages` path."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from app.api import tools
from app.api.adapter import Adapter, adapter, request_id
from app.api.bounds import Count, PositiveCount, real
from app.api.errors import ConduitError, invalid, stream_failure
from app.api.pipeline import Pipeline
from app.api.protocol import GenerateRequest, ToolSpec
from app.api.wire.openai_extras import FunctionName, check
from app.config import AppConfig
from app.engine.engine import RequestOutput
from app.engine.sampling_params import GuidedDecoding, SamplingParams

TOOL_ID_PREFIX = "toolu_"

# Fields of Anthropic's API this server does not implement: refused by name, never ignored.
UNSUPPORTED_FIELDS = (
    "thinking", "container", "mcp_servers", "context_management", "service_tier", "speed", "inference_geo",
    "diagnostics", "user_profile_id", "workspace_id",
)
BLOCK_TYPES = ("text", "tool_use", "tool_result")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)  # unknown fields: 400 naming them


class CacheControl(_Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    # accepted as a hint: the engine's prefix cache reuses every shared prompt prefix anyway
    cache_control: CacheControl | None = None
    citations: None = None  # the SDK sends a reply's `citations: null` back with it


def as_blocks(content: Any) -> Any:
    """A string is shorthand for one text block; one list type keeps error paths plain
    (`messages.0.content.0.text`) instead of naming union branches."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError("must be a string or a list of content blocks")
    return content


TextContent = Annotated[list[TextBlock], BeforeValidator(as_blocks, json_schema_input_type=str | list[TextBlock])]


def text_of(content: list) -> str:
    return "".join(block.text for block in content if isinstance(block, TextBlock))


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict
    cache_control: CacheControl | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: TextContent = []
    is_error: bool = False
    cache_control: CacheControl | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]
Content = Annotated[list[Block], BeforeValidator(as_blocks, json_schema_input_type=str | list[Block])]


class InputMessage(_Strict):
    role: Literal["user", "assistant", "system"]
    content: Content

    def to_internal(self, param: str, call_names: dict[str, str]) -> list[dict]:
        """transformers' messages (see GenerateRequest.messages): an assistant's tool_use blocks
        become its tool_calls, a user's tool_result blocks `tool` messages before its text."""
        calls = [b for b in self.content if isinstance(b, ToolUseBlock)]
        results = [b for b in self.content if isinstance(b, ToolResultBlock)]
        if (calls and self.role != "assistant") or (results and self.role != "user"):
            raise invalid(f"{param}: tool_use blocks belong in assistant messages, tool_result blocks in "
                          "user messages", param)
        if calls:
            call_names.update((c.id, c.name) for c in calls)
            tool_calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.input}}
                          for c in calls]
            return [{"role": "assistant", "content": text_of(self.content) or None, "tool_calls": tool_calls}]
        messages = [{"role": "tool", "tool_call_id": r.tool_use_id, "name": call_names.get(r.tool_use_id, ""),
                     "content": ("Error: " if r.is_error else "") + text_of(r.content)} for r in results]
        if text_of(self.content) or not results:
            messages.append({"role": self.role, "content": text_of(self.content)})
        return messages


class Metadata(_Strict):
    user_id: str | None = None  # an opaque id for the caller's records; it changes nothing here


class ToolDef(_Strict):
    name: FunctionName
    description: str | None = None
    input_schema: dict
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None

    def to_internal(self, index: int) -> ToolSpec:
        check(self.input_schema, f"tools.{index}.input_schema")
        return ToolSpec(self.name, self.description, self.input_schema)


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False  # honoured: at most one tool_use block

    @model_validator(mode="after")
    def _name_with_tool(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name is required with type tool, and only with it")
        return self


INTERNAL_TOOL_CHOICE = {"auto": "auto", "any": "required", "tool": "required", "none": "none"}


class JsonOutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")


class OutputConfig(_Strict):
    format: JsonOutputFormat | None = None


def refuse_unsupported(data: dict) -> None:
    """Fields, blocks and tools this server does not implement get a 400 that says so."""
    for name in UNSUPPORTED_FIELDS:
        if data.get(name) is not None:
            raise unsupported(name, f"`{name}`")
    lists = [("system", data.get("system"))]
    messages = data.get("messages") if isinstance(data.get("messages"), list) else []  # else pydantic says why
    lists += [(f"messages.{i}.content", m.get("content")) for i, m in enumerate(messages) if isinstance(m, dict)]
    for path, blocks in lists:
        for j, block in enumerate(blocks if isinstance(blocks, list) else []):
            if isinstance(block, dict) and block.get("type") not in BLOCK_TYPES:
                raise unsupported(f"{path}.{j}", f"`{block.get('type')}` content blocks")
    for i, tool in enumerate(data.get("tools") if isinstance(data.get("tools"), list) else []):
        if isinstance(tool, dict) and tool.get("type") not in (None, "custom"):
            raise unsupported(f"tools.{i}", f"`{tool['type']}` (server) tools")


def unsupported(name: str, what: str) -> ConduitError:
    return ConduitError(f"{name}: this server does not support {what}", param=name, code="unsupported_parameter")


class _MessagesInput(_Strict):
    """What both /v1/messages and /v1/messages/count_tokens read: the model and the prompt."""

    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: TextContent | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    cache_control: CacheControl | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_unsupported(data)
        return data

    def chat_messages(self) -> list[dict]:
        messages = [] if self.system is None else [{"role": "system", "content": text_of(self.system)}]
        call_names: dict[str, str] = {}  # tool_use id -> tool name, for the results that follow
        for i, m in enumerate(self.messages):
            messages += m.to_internal(f"messages.{i}", call_names)
        return messages

    def internal(self, request_id: str, sampling: SamplingParams, **fields) -> GenerateRequest:
        last = self.messages[-1]
        # a final assistant message is a prefill: the reply continues it rather than starting a turn
        prefill = last.role == "assistant"
        if prefill and any(isinstance(b, ToolUseBlock) for b in last.content):
            raise invalid(f"messages.{len(self.messages) - 1}: a final assistant message with tool_use "
                          "needs a user message with its tool_result after it", "messages")
        req = GenerateRequest(request_id, self.model, sampling, messages=self.chat_messages(),
                              continue_final_message=prefill, **fields)
        self._tools_to_internal(req)
        return req

    def _tools_to_internal(self, req: GenerateRequest) -> None:
        choice = self.tool_choice.type if self.tool_choice else "auto"
        if not self.tools:
            if choice != "none" and self.tool_choice is not None:
                raise invalid("tool_choice needs tools", "tool_choice")
            return
        req.tools = [tool.to_internal(i) for i, tool in enumerate(self.tools)]
        req.tool_choice = INTERNAL_TOOL_CHOICE[choice]
        if choice == "tool":
            if self.tool_choice.name not in {t.name for t in req.tools}:
                raise invalid(f"tool_choice.name: {self.tool_choice.name!r} is not one of the tools", "tool_choice.name")
            req.tool_name = self.tool_choice.name

    @property
    def max_tool_calls(self) -> int | None:
        return 1 if self.tool_choice and self.tool_choice.disable_parallel_tool_use else None


class MessagesRequest(_MessagesInput):
    max_tokens: PositiveCount
    stop_sequences: list[Annotated[str, Field(min_length=1)]] = []  # count capped by ingress.input_limits
    temperature: real(ge=0, le=1) = 1.0
    top_p: real(gt=0, le=1) = 1.0
    top_k: Count = 0
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None
    stream: bool = False

    def to_internal(self, request_id: str) -> GenerateRequest:
        sampling = SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                  top_k=self.top_k, stop=list(self.stop_sequences))
        req = self.internal(request_id, sampling, stream=self.stream)
        output_format = self.output_config.format if self.output_config else None
        if output_format is not None:
            if tools.forced(req):
                raise invalid("a forced tool call cannot be combined with output_config.format", "output_config.format")
            check(output_format.schema_, "output_config.format.schema")
            sampling.guided = GuidedDecoding(output_format.schema_, param="output_config.format.schema")
        return req


class CountTokensRequest(_MessagesInput):
    def to_internal(self, request_id: str) -> GenerateRequest:
        # max_tokens_given=False: only the prompt's own length is checked against the window
        return self.internal(request_id, SamplingParams(), max_tokens_given=False)


# responses ------------------------------------------------------------------------------------
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def error_body(err: ConduitError) -> dict:
    kind = ERROR_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def stop_fields(out: RequestOutput, called_tools: bool) -> dict:
    """stop_reason and stop_sequence; a stop token id (not an Anthropic notion) reads as end_turn."""
    if called_tools:
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if isinstance(out.stop_reason, str):
        return {"stop_reason": "stop_sequence", "stop_sequence": out.stop_reason}
    return {"stop_reason": STOP_REASONS.get(out.finish_reason), "stop_sequence": None}


def usage(out: RequestOutput) -> dict:
    return {"input_tokens": out.num_prompt_tokens, "output_tokens": out.num_output_tokens}


def message_object(message_id: str, model: str, content: list[dict], stop: dict, usage: dict) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            **stop, "usage": usage}


def split_calls(req: GenerateRequest, text: str, max_calls: int | None) -> tuple[str | None, list[tools.ToolCall]]:
    """(text, tool calls) of a whole output; a forced call cut short stays text."""
    if not req.tools or req.tool_choice == "none":
        return text, []
    if tools.forced(req):
        calls = tools.parse_forced(text, TOOL_ID_PREFIX)
        return (None if calls else text), calls
    rest, calls = tools.parse_auto(text, req.tools, TOOL_ID_PREFIX)
    return rest, calls[:max_calls]


def tool_use_block(call: tools.ToolCall) -> dict:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)}


def content_blocks(text: str | None, calls: list[tools.ToolCall]) -> list[dict]:
    """A text block when there is text or nothing else, then one tool_use block per call."""
    blocks = [{"type": "text", "text": text or ""}] if text or not calls else []
    return blocks + [tool_use_block(c) for c in calls]


def event(kind: str, payload: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, separators=(',', ':'))}\n\n"


class BlockEvents:
    """Engine text deltas -> content-block events: text as it comes; under tools, the text that
    may be a call held back (tools.AutoCallStream) or a forced call's arguments passed on as
    `input_json_delta`s (tools.ForcedCallStream). `ping` follows the first block's start."""

    def __init__(self, req: GenerateRequest, max_calls: int | None):
        use_tools = bool(req.tools) and req.tool_choice != "none"
        self.forced = tools.ForcedCallStream() if use_tools and tools.forced(req) else None
        self.auto = tools.AutoCallStream(req.tools, TOOL_ID_PREFIX) if use_tools and not self.forced else None
        self.max_calls = max_calls
        self.index, self.open_kind, self.calls = -1, None, 0

    def feed(self, delta: str, final: bool) -> list[str]:
        if self.forced:
            events = self._forced(delta, final)
        elif self.auto:
            events = self._text(self.auto.feed(delta))
            if final:
                rest, calls = self.auto.finish()
                events += self._text(rest or "", open_empty=not calls and self.index < 0)
                for call in calls[: self.max_calls]:
                    events += self._start({**tool_use_block(call), "input": {}})  # input comes as deltas
                    events += self._delta({"type": "input_json_delta", "partial_json": call.arguments})
        else:
            events = self._text(delta, open_empty=True)
        return events + (self._stop() if final else [])

    def _forced(self, delta: str, final: bool) -> list[str]:
        name, args = self.forced.feed(delta, final)
        events = []
        if name is not None:
            call_id = tools.new_call_id(TOOL_ID_PREFIX)
            events += self._start({"type": "tool_use", "id": call_id, "name": name, "input": {}})
        if args:
            events += self._delta({"type": "input_json_delta", "partial_json": args})
        if final and self.index < 0:  # cut short before the call's name: what there is, as text
            events += self._text(self.forced.text, open_empty=True)
        return events

    def _text(self, text: str, open_empty: bool = False) -> list[str]:
        if not text and not (open_empty and self.open_kind != "text"):
            return []
        events = [] if self.open_kind == "text" else self._start({"type": "text", "text": ""})
        return events + (self._delta({"type": "text_delta", "text": text}) if text else [])

    def _start(self, block: dict) -> list[str]:
        events = self._stop()
        self.index += 1
        self.open_kind = block["type"]
        self.calls += block["type"] == "tool_use"
        events.append(event("content_block_start", {"index": self.index, "content_block": block}))
        return events + ([event("ping", {})] if self.index == 0 else [])

    def _delta(self, delta: dict) -> list[str]:
        return [event("content_block_delta", {"index": self.index, "delta": delta})]

    def _stop(self) -> list[str]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        return [event("content_block_stop", {"index": self.index})]


async def stream_events(message_id: str, model: str, blocks: BlockEvents, stream):
    """Anthropic's event sequence. Errors after the 200 go out as an `error` event (the status
    is already sent), never as a silent cut."""
    last: RequestOutput | None = None
    try:
        async for _, out in stream:
            if last is None:
                opening = message_object(message_id, model, [], {"stop_reason": None, "stop_sequence": None},
                                         {"input_tokens": out.num_prompt_tokens, "output_tokens": 0})
                yield event("message_start", {"message": opening})
            for line in blocks.feed(out.text, out.finished):
                yield line
            last = out
        yield event("message_delta", {"delta": stop_fields(last, blocks.calls > 0), "usage": usage(last)})
        yield event("message_stop", {})
    except Exception as e:
        yield event("error", {"error": error_body(stream_failure(e))["error"]})
    finally:
        await stream.aclose()


# routes ---------------------------------------------------------------------------------------
@adapter
def routes(pipeline: Pipeline, config: AppConfig):
    router = APIRouter()

    # x-api-key / authorization and anthropic-version are accepted as the SDK sends them; the
    # version changes nothing here (one wire format is served).
    @router.post("/v1/messages")
    async def messages(request: Request, body: MessagesRequest):
        rid = request_id(request)
        message_id = "msg_" + rid
        req = body.to_internal(rid)
        if not body.stream:
            out = (await pipeline.complete(req))[0]
            text, calls = split_calls(req, out.text, body.max_tool_calls)
            stop = stop_fields(out, bool(calls))
            return message_object(message_id, body.model, content_blocks(text, calls), stop, usage(out))
        stream = await pipeline.stream(req)  # errors before the first token still get a status code
        blocks = BlockEvents(req, body.max_tool_calls)
        return StreamingResponse(stream_events(message_id, body.model, blocks, stream), media_type="text/event-stream")

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request, body: CountTokensRequest):
        tokens, _ = await pipeline.tokenize(body.to_internal(request_id(request)))
        return {"input_tokens": len(tokens)}

    def error_response(err: ConduitError) -> JSONResponse:
        return JSONResponse(error_body(err), status_code=err.status)

    return Adapter(router, error_response, prefixes=("/v1/messages",))
