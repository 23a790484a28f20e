"""Anthropic Messages wire format: request schemas, their translation into the internal
`GenerateRequest`, the message object and stream events built from engine outputs, and the
routes (`routes()`). Errors take Anthropic's shape on every `/v1/messages` path."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from app.api.errors import ConduitError
from app.api.pipeline import Pipeline
from app.api.protocol import GenerateRequest
from app.engine.engine import RequestOutput
from app.engine.sampling_params import SamplingParams

MAX_STOP_SEQUENCES = 16

# Fields of Anthropic's API this server does not implement: refused by name, never ignored.
UNSUPPORTED_FIELDS = (
    "tools", "tool_choice", "thinking", "output_config", "container", "mcp_servers", "context_management",
    "service_tier", "speed", "inference_geo", "diagnostics", "user_profile_id", "workspace_id",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown fields: 400 naming them


class CacheControl(_Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    # accepted as a hint: the engine's prefix cache reuses every shared prompt prefix anyway
    cache_control: CacheControl | None = None


BLOCK_TYPES = ("text",)


def as_blocks(content: Any) -> Any:
    """A string is shorthand for one text block; one list type keeps error paths plain
    (`messages.0.content.0.text`) instead of naming union branches."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError("must be a string or a list of content blocks")
    return content


Content = Annotated[list[TextBlock], BeforeValidator(as_blocks, json_schema_input_type=str | list[TextBlock])]


def text_of(content: list[TextBlock]) -> str:
    return "".join(block.text for block in content)


def unsupported(name: str, what: str) -> ConduitError:
    return ConduitError(f"{name}: this server does not support {what}", param=name, code="unsupported_parameter")


def refuse_unsupported_blocks(data: dict) -> None:
    """Image, document, thinking... blocks get a 400 that says so, not a type mismatch."""
    lists = [("system", data.get("system"))]
    messages = data.get("messages") if isinstance(data.get("messages"), list) else []  # else pydantic says why
    lists += [(f"messages.{i}.content", m.get("content")) for i, m in enumerate(messages) if isinstance(m, dict)]
    for path, blocks in lists:
        for j, block in enumerate(blocks if isinstance(blocks, list) else []):
            if isinstance(block, dict) and block.get("type") not in BLOCK_TYPES:
                raise unsupported(f"{path}.{j}", f"`{block.get('type')}` content blocks")


class InputMessage(_Strict):
    role: Literal["user", "assistant", "system"]
    content: Content


class Metadata(_Strict):
    user_id: str | None = None  # an opaque id for the caller's records; it changes nothing here


class _MessagesInput(_Strict):
    """What both /v1/messages and /v1/messages/count_tokens read: the model and the prompt."""

    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: Content | None = None
    cache_control: CacheControl | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in UNSUPPORTED_FIELDS:
                if data.get(name) is not None:
                    raise unsupported(name, f"`{name}`")
            refuse_unsupported_blocks(data)
        return data

    def chat_messages(self) -> list[dict]:
        system = [] if self.system is None else [{"role": "system", "content": text_of(self.system)}]
        return system + [{"role": m.role, "content": text_of(m.content)} for m in self.messages]

    def internal(self, request_id: str, sampling: SamplingParams, **fields) -> GenerateRequest:
        # a final assistant message is a prefill: the reply continues it rather than starting a turn
        prefill = self.messages[-1].role == "assistant"
        return GenerateRequest(request_id, self.model, sampling, messages=self.chat_messages(),
                               continue_final_message=prefill, **fields)


class MessagesRequest(_MessagesInput):
    max_tokens: Annotated[int, Field(gt=0)]
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)] = []
    temperature: Annotated[float, Field(ge=0, le=1)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    metadata: Metadata | None = None
    stream: bool = False

    def to_internal(self, request_id: str) -> GenerateRequest:
        sampling = SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                  top_k=self.top_k, stop=list(self.stop_sequences))
        return self.internal(request_id, sampling, stream=self.stream)


class CountTokensRequest(_MessagesInput):
    def to_internal(self, request_id: str) -> GenerateRequest:
        # max_tokens_given=False: only the prompt's own length is checked against the window
        return self.internal(request_id, SamplingParams(), max_tokens_given=False)


# responses ------------------------------------------------------------------------------------
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 529: "overloaded_error"}


def error_body(err: ConduitError) -> dict:
    kind = ERROR_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def stop_fields(out: RequestOutput) -> dict:
    """stop_reason and stop_sequence; a stop token id (not an Anthropic notion) reads as end_turn."""
    if isinstance(out.stop_reason, str):
        return {"stop_reason": "stop_sequence", "stop_sequence": out.stop_reason}
    return {"stop_reason": STOP_REASONS.get(out.finish_reason), "stop_sequence": None}


def usage(out: RequestOutput) -> dict:
    return {"input_tokens": out.num_prompt_tokens, "output_tokens": out.num_output_tokens}


def message_object(message_id: str, model: str, content: list[dict], stop: dict, usage: dict) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            **stop, "usage": usage}


def event(kind: str, payload: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, separators=(',', ':'))}\n\n"


async def stream_events(message_id: str, model: str, stream):
    """Anthropic's event sequence for one text block. Errors after the 200 go out as an `error`
    event (the status is already sent), never as a silent cut."""
    last: RequestOutput | None = None
    try:
        async for _, out in stream:
            if last is None:
                opening = message_object(message_id, model, [], {"stop_reason": None, "stop_sequence": None},
                                         {"input_tokens": out.num_prompt_tokens, "output_tokens": 0})
                yield event("message_start", {"message": opening})
                yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
                yield event("ping", {})
            if out.text:
                yield event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": out.text}})
            last = out
        yield event("content_block_stop", {"index": 0})
        yield event("message_delta", {"delta": stop_fields(last), "usage": usage(last)})
        yield event("message_stop", {})
    except Exception as e:
        err = e if isinstance(e, ConduitError) else ConduitError(f"generation failed: {e}", 500, "server_error")
        yield event("error", {"error": error_body(err)["error"]})
    finally:
        await stream.aclose()


# routes ---------------------------------------------------------------------------------------
def routes(pipeline: Pipeline):
    from app.api.server import Adapter, request_id

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
            content = [{"type": "text", "text": out.text}]
            return message_object(message_id, body.model, content, stop_fields(out), usage(out))
        stream = await pipeline.stream(req)  # errors before the first token still get a status code
        return StreamingResponse(stream_events(message_id, body.model, stream), media_type="text/event-stream")

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request, body: CountTokensRequest):
        tokens, _ = await pipeline.tokenize(body.to_internal(request_id(request)))
        return {"input_tokens": len(tokens)}

    def error_response(err: ConduitError) -> JSONResponse:
        return JSONResponse(error_body(err), status_code=err.status)

    return Adapter(router, error_response, prefixes=("/v1/messages",))
