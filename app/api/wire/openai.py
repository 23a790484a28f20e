"""OpenAI wire format: request schemas, their translation into the internal `GenerateRequest`,
the response / stream-chunk objects built from engine outputs, and the routes (`routes()`)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api import tools
from app.api.adapter import Adapter, adapter, request_id
from app.api.bounds import MIN_REPETITION_PENALTY, Count, PositiveCount, Priority, Seed, real
from app.api.errors import ConduitError, invalid, stream_failure
from app.api.pipeline import Pipeline
from app.api.protocol import GenerateRequest
from app.api.wire.openai_extras import (
    ChatTool,
    MessageToolCall,
    ResponseFormat,
    ToolChoice,
    chat_logprobs,
    completion_logprobs,
    tool_call_json,
)
from app.config import AppConfig
from app.engine.engine import RequestOutput
from app.engine.sampling_params import SamplingParams


class _Request(BaseModel):
    # unknown fields are refused (400 naming them) rather than silently ignored
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: PositiveCount | None = None
    temperature: real(ge=0, le=2) | None = None
    top_p: real(gt=0, le=1) | None = None
    n: Annotated[int, Field(ge=1)] = 1  # caps on n, stop, ...: ingress.input_limits, in the Pipeline
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: real(ge=-2, le=2) = 0.0
    frequency_penalty: real(ge=-2, le=2) = 0.0
    user: str | None = None
    # extensions (vLLM's names), for benchmarks and fine control
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] = 0
    min_p: real(ge=0, le=1) = 0.0
    repetition_penalty: real(ge=MIN_REPETITION_PENALTY, le=10) = 1.0
    ignore_eos: bool = False
    min_tokens: Count = 0
    priority: Priority = 0

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens or 1,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            stop=stop,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant: calls it made
    tool_call_id: str | None = None  # tool: the call this is the result of

    def to_internal(self, param: str) -> dict:
        """transformers' message format (see GenerateRequest.messages)."""
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            # as OpenAI: only an assistant message that makes calls may go without content
            raise invalid(f"Missing required parameter: '{param}.content'.", f"{param}.content",
                          "missing_required_parameter")
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["content"] = self.text() or None
            message["tool_calls"] = [_call_to_internal(c, f"{param}.tool_calls.{i}") for i, c in enumerate(self.tool_calls)]
        return message

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


def _call_to_internal(call: MessageToolCall, param: str) -> dict:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise invalid("function.arguments must be a JSON object", f"{param}.function.arguments")
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveCount | None = None
    logprobs: bool = False
    top_logprobs: Count | None = None  # cap: ingress.input_limits
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; a forced call is one call

    @model_validator(mode="after")
    def _one_max(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("set max_tokens or max_completion_tokens, not both")
        return self

    def to_internal(self, request_id: str) -> GenerateRequest:
        max_tokens = self.max_completion_tokens or self.max_tokens
        messages = [m.to_internal(f"messages.{i}") for i, m in enumerate(self.messages)]
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        sampling = self.sampling(max_tokens)
        sampling.logprobs = (self.top_logprobs or 0) if self.logprobs else None
        sampling.guided = self.response_format.guided() if self.response_format else None
        req = GenerateRequest(
            request_id=request_id,
            model=self.model,
            sampling=sampling,
            messages=messages,
            max_tokens_given=max_tokens is not None,
            stream=self.stream,
            n=self.n,
            priority=self.priority,
        )
        self._tools_to_internal(req)
        return req

    def _tools_to_internal(self, req: GenerateRequest) -> None:
        choice = self.tool_choice or "auto"
        if not self.tools:
            if choice not in ("auto", "none"):
                raise invalid("tool_choice requires tools", "tool_choice")
            return
        req.tools = [tool.to_internal(i) for i, tool in enumerate(self.tools)]
        if isinstance(choice, str):
            req.tool_choice = choice
        elif choice.function.name in {t.name for t in req.tools}:
            req.tool_choice, req.tool_name = "required", choice.function.name
        else:
            raise invalid(f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice")
        if tools.forced(req) and req.sampling.guided is not None:
            raise invalid("a forced tool call cannot be combined with response_format", "response_format")


class CompletionRequest(_Request):
    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: PositiveCount | None = 16  # OpenAI's default for completions
    logprobs: Count | None = None  # cap: ingress.input_limits
    echo: bool = False
    suffix: str | None = None  # fill-in-the-middle (needs a model with FIM tokens)

    def to_internal(self, request_id: str) -> GenerateRequest:
        prompt = self.prompt[0] if isinstance(self.prompt, list) and isinstance(self.prompt[0], str) else self.prompt
        if prompt == "":
            raise invalid("prompt must not be empty", "prompt")
        sampling = self.sampling(self.max_tokens)
        sampling.logprobs = self.logprobs
        sampling.prompt_logprobs = self.logprobs if self.echo else None
        return GenerateRequest(
            request_id=request_id,
            model=self.model,
            sampling=sampling,
            prompt=prompt,
            max_tokens_given=self.max_tokens is not None,
            stream=self.stream,
            n=self.n,
            suffix=self.suffix,
            priority=self.priority,
        )


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    def to_internal(self, request_id: str) -> GenerateRequest:
        messages = None if self.messages is None else [m.to_internal(f"messages.{i}") for i, m in enumerate(self.messages)]
        # max_tokens_given=False: only the prompt's own length is checked against the window
        return GenerateRequest(request_id, self.model, SamplingParams(), prompt=self.prompt,
                               messages=messages, max_tokens_given=False)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    tokens: list[Annotated[int, Field(ge=0)]]


ChatCompletionRequest.model_rebuild()
TokenizeRequest.model_rebuild()
CompletionRequest.model_rebuild()


# responses ------------------------------------------------------------------------------------
def list_page(data: list[dict], has_more: bool) -> dict:
    """OpenAI's cursor-paged list (files, batches, a response's input items)."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def error_body(err: ConduitError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def usage(outs: list[RequestOutput]) -> dict:
    prompt = outs[0].num_prompt_tokens  # one prompt, counted once however many choices
    completion = sum(out.num_output_tokens for out in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ResponseBuilder:
    """Builds one request's response objects (whole, or as stream chunks) in OpenAI's format.
    `req`: the internal request, for its tools; `echo`: completions' prompt text, put before each
    choice's text."""

    def __init__(self, kind: Literal["chat", "completion"], response_id: str, model: str, include_usage: bool,
                 req: GenerateRequest | None = None, echo: str | None = None):
        self.kind, self.id, self.model, self.include_usage = kind, response_id, model, include_usage
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self.tools = req.tools if req is not None and req.tool_choice != "none" else []
        self.forced = req is not None and tools.forced(req)
        self.tool_name = req.tool_name if req is not None else None
        self.echo = echo
        self.call_streams: dict[int, tools.ForcedCallStream | tools.AutoCallStream] = {}  # per choice
        self.offsets: dict[int, int] = {}  # per choice: chars of text so far (completions' text_offset)
        # a text chunk's SSE line up to its choice's index, and after its finish_reason: what `sse` of
        # `_chunk`'s payload writes there, rendered once (see `_plain`)
        self._head = (f'data: {{"id":{json.dumps(self.id)},"object":{json.dumps(self.chunk_object)},'
                      f'"created":{self.created},"model":{json.dumps(self.model)},"choices":[{{"index":')
        self._tail = ',"usage":null}\n\n' if include_usage and kind == "chat" else "}\n\n"

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def complete(self, outs: list[RequestOutput]) -> dict:
        choices = []
        for index, out in enumerate(outs):
            if self.kind == "chat":
                message, finish_reason = self._message(out)
                logprobs = chat_logprobs(out.logprobs) if out.logprobs is not None else None
                choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason})
            else:
                text = (self.echo or "") + out.text
                logprobs = self._completion_logprobs(index, out, first=True)
                choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason})
        return self._envelope(self.object, choices, usage=usage(outs))

    def _message(self, out: RequestOutput) -> tuple[dict, str | None]:
        if not self.tools:
            return {"role": "assistant", "content": out.text, "refusal": None}, out.finish_reason
        whole = True
        if self.forced:  # always a call, as OpenAI: one cut short (max_tokens) has partial arguments
            calls = tools.parse_forced(out.text)
            whole = bool(calls)
            calls = calls or [tools.cut_call(out.text, self.tools, self.tool_name)]
            content = None
        else:
            content, calls = tools.parse_auto(out.text, self.tools)
        message = {"role": "assistant", "content": content, "refusal": None}
        if not calls:
            return message, out.finish_reason
        message["tool_calls"] = [tool_call_json(call) for call in calls]
        return message, "tool_calls" if whole and out.finish_reason == "stop" else out.finish_reason

    def _completion_logprobs(self, index: int, out: RequestOutput, first: bool) -> dict | None:
        if out.logprobs is None:
            return None
        entries = (out.prompt_logprobs or []) + out.logprobs if self.echo is not None and first else out.logprobs
        logprobs, self.offsets[index] = completion_logprobs(entries, self.offsets.get(index, 0))
        return logprobs

    def chunks(self, index: int, out: RequestOutput, first: bool) -> list[str]:
        """SSE `data:` lines for one (coalesced) engine delta of choice `index`."""
        lines = []
        if self.kind == "chat" and first:
            delta = {"role": "assistant", "content": "", "refusal": None}
            lines.append(self._chunk({"index": index, "delta": delta, "logprobs": None, "finish_reason": None}))
        if out.text or out.finished or out.logprobs or (first and self.echo):
            if out.logprobs is None and not (self.kind == "chat" and self.tools):
                lines.append(self._plain(index, out, first))
            elif self.kind == "chat":
                delta, finish_reason = self._delta(index, out)
                logprobs = chat_logprobs(out.logprobs) if out.logprobs is not None else None
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
                lines.append(self._chunk(choice))
            else:
                text = (self.echo or "") + out.text if first else out.text
                logprobs = self._completion_logprobs(index, out, first)
                choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}
                lines.append(self._chunk(choice))
        return lines

    def render(self, index: int, out: RequestOutput, first: bool) -> str:
        """`chunks`, as one string: the events of one delta go out in one write."""
        return "".join(self.chunks(index, out, first))

    def _plain(self, index: int, out: RequestOutput, first: bool) -> str:
        """The chunk of a delta without log-probs or tool calls: the same bytes as `_chunk` of its
        choice, with only the text and finish reason formatted (the stream's per-token path)."""
        finish_reason = "null" if out.finish_reason is None else json.dumps(out.finish_reason)
        if self.kind == "chat":
            body = f',"delta":{{"content":{json.dumps(out.text)}}}' if out.text else ',"delta":{}'
        else:
            body = f',"text":{json.dumps((self.echo or "") + out.text if first else out.text)}'
        return f'{self._head}{index}{body},"logprobs":null,"finish_reason":{finish_reason}}}]{self._tail}'

    def _delta(self, index: int, out: RequestOutput) -> tuple[dict, str | None]:
        """A chat delta: text, or tool-call parts in OpenAI's streaming form."""
        if not self.tools:
            return ({"content": out.text} if out.text else {}), out.finish_reason
        if index not in self.call_streams:
            self.call_streams[index] = tools.ForcedCallStream() if self.forced else tools.AutoCallStream(self.tools)
        stream = self.call_streams[index]
        calls, content = [], ""
        if self.forced:
            name, arguments = stream.feed(out.text, out.finished)
            if name is not None:
                calls.append({"index": 0, "id": tools.new_call_id(), "type": "function",
                              "function": {"name": name, "arguments": arguments}})
            elif arguments:
                calls.append({"index": 0, "function": {"arguments": arguments}})
            if out.finished and stream.name is None:  # cut short before the call's name was written
                call = tools.cut_call(stream.text, self.tools, self.tool_name)
                calls.append(tool_call_json(call, 0))
            made_call = out.finished and stream.whole()
        else:
            content = stream.feed(out.text)
            if out.finished:
                rest, found = stream.finish()
                content += rest or ""
                calls = [tool_call_json(call, i) for i, call in enumerate(found)]
            made_call = bool(calls)
        delta = {"content": content} if content else {}
        if calls:
            delta["tool_calls"] = calls
        finish_reason = "tool_calls" if made_call and out.finish_reason == "stop" else out.finish_reason
        return delta, finish_reason

    def usage_chunk(self, outs: list[RequestOutput]) -> str:
        return sse(self._envelope(self.chunk_object, [], usage=usage(outs)))

    def _chunk(self, choice: dict) -> str:
        payload = self._envelope(self.chunk_object, [choice])
        if self.include_usage and self.kind == "chat":  # chat's schema has `usage: null` until the end;
            payload["usage"] = None  # completions' has no null there, so the field is left out
        return sse(payload)


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# routes ---------------------------------------------------------------------------------------
@adapter
def routes(pipeline: Pipeline, config: AppConfig):
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await respond(pipeline, request_id(request), "chat", body)

    @router.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await respond(pipeline, request_id(request), "completion", body)

    @router.get("/v1/models")
    async def list_models():
        data = [model_card(model_id, name) for model_id, name in pipeline.served_ids().items()]
        data += [model_card(name, base, parent=base) for name, base in await pipeline.adapters()]
        return {"object": "list", "data": data}

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str):
        if model not in pipeline.served_ids():  # a LoRA adapter's card, if it is one
            for name, base in await pipeline.adapters():
                if model in (name, f"{base}:{name}"):
                    return model_card(model, base, parent=base)
        return model_card(model, pipeline.resolve_any(model))

    @router.post("/tokenize")
    async def tokenize(request: Request, body: TokenizeRequest):
        tokens, max_model_len = await pipeline.tokenize(body.to_internal(request_id(request)))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return {"prompt": await pipeline.detokenize(body.model, body.tokens)}

    return Adapter(router, lambda err: JSONResponse(error_body(err), status_code=err.status), default=True)


async def respond(pipeline: Pipeline, rid: str, kind: str, body: ChatCompletionRequest | CompletionRequest):
    """One chat or text completion, whole or streamed (also serves Azure's deployment routes)."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    req = body.to_internal(rid)
    echo = await _echo_text(pipeline, req) if kind == "completion" and body.echo else None
    builder = ResponseBuilder(kind, ("chatcmpl-" if kind == "chat" else "cmpl-") + rid, body.model, include_usage,
                              req, echo)
    if not body.stream:
        return builder.complete(await pipeline.complete(req))
    stream = await pipeline.stream(req)  # errors before the first token still get a status code
    return SSEResponse(builder, stream, req.n)


async def _echo_text(pipeline: Pipeline, req: GenerateRequest) -> str:
    if isinstance(req.prompt, str):
        return req.prompt
    return await pipeline.detokenize(req.model, req.prompt)


def model_card(model_id: str, name: str, parent: str | None = None) -> dict:
    """`parent`: the base model of a LoRA adapter (vLLM's card), else None."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "conduit", "root": name, "parent": parent}


class SSEResponse(StreamingResponse):
    """A streamed chat or text completion. Starlette's `StreamingResponse` (its disconnect listener,
    its task group) around a body sent straight from the builder: each delta's events in one body
    message, and the last delta (which nothing follows but the usage chunk and `[DONE]`, made at once)
    together with those and the body's end, in one. The bytes are those of one event per message."""

    def __init__(self, builder: ResponseBuilder, stream, n: int):
        self.builder, self.stream, self.n = builder, stream, n
        self.body_iterator = None  # unused: stream_response below reads `stream`
        self.status_code, self.media_type, self.background = 200, "text/event-stream", None
        self.init_headers(None)

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        builder, stream, n = self.builder, self.stream, self.n
        last: dict[int, RequestOutput] = {}  # each choice's latest delta (it carries the running counts)
        finished = 0
        held = ""  # the last delta's events: they go out with the end of the body
        try:
            async for index, out in stream:
                events = builder.render(index, out, first=index not in last)
                last[index] = out
                finished += out.finished
                if finished == n:
                    held = events
                elif events:
                    await send({"type": "http.response.body", "body": events.encode(), "more_body": True})
            if builder.include_usage:
                held += builder.usage_chunk([last[i] for i in range(n)])
        except Exception as e:  # after the 200 the status is sent: report in the stream, never cut silently
            held += sse(error_body(stream_failure(e)))
        finally:
            await stream.aclose()
        await send({"type": "http.response.body", "body": (held + SSE_DONE).encode(), "more_body": False})
