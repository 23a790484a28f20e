"""OpenAI wire format: request schemas, their translation into the internal `GenerateRequest`,
the response / stream-chunk objects built from engine outputs, and the routes (`routes()`)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.errors import ConduitError, invalid
from app.api.pipeline import Pipeline
from app.api.protocol import GenerateRequest
from app.engine.engine import RequestOutput
from app.engine.sampling_params import SamplingParams


class _Request(BaseModel):
    # unknown fields are refused (400 naming them) rather than silently ignored
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] = 1  # caps on n, stop, ...: ingress.input_limits, in the Pipeline
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    user: str | None = None
    # extensions (vLLM's names), for benchmarks and fine control
    top_k: Annotated[int, Field(ge=-1)] = 0
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0

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
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _one_max(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("set max_tokens or max_completion_tokens, not both")
        return self

    def to_internal(self, request_id: str) -> GenerateRequest:
        max_tokens = self.max_completion_tokens or self.max_tokens
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        return GenerateRequest(
            request_id=request_id,
            model=self.model,
            sampling=self.sampling(max_tokens),
            messages=messages,
            max_tokens_given=max_tokens is not None,
            stream=self.stream,
            n=self.n,
        )


class CompletionRequest(_Request):
    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(gt=0)] | None = 16  # OpenAI's default for completions

    def to_internal(self, request_id: str) -> GenerateRequest:
        prompt = self.prompt[0] if isinstance(self.prompt, list) and isinstance(self.prompt[0], str) else self.prompt
        if prompt == "":
            raise invalid("prompt must not be empty", "prompt")
        return GenerateRequest(
            request_id=request_id,
            model=self.model,
            sampling=self.sampling(self.max_tokens),
            prompt=prompt,
            max_tokens_given=self.max_tokens is not None,
            stream=self.stream,
            n=self.n,
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
        messages = None if self.messages is None else [{"role": m.role, "content": m.text()} for m in self.messages]
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
def error_body(err: ConduitError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def usage(outs: list[RequestOutput]) -> dict:
    prompt = outs[0].num_prompt_tokens  # one prompt, counted once however many choices
    completion = sum(out.num_output_tokens for out in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ResponseBuilder:
    """Builds one request's response objects (whole, or as stream chunks) in OpenAI's format."""

    def __init__(self, kind: Literal["chat", "completion"], response_id: str, model: str, include_usage: bool):
        self.kind, self.id, self.model, self.include_usage = kind, response_id, model, include_usage
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def complete(self, outs: list[RequestOutput]) -> dict:
        choices = []
        for index, out in enumerate(outs):
            if self.kind == "chat":
                message = {"role": "assistant", "content": out.text}
                choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": out.finish_reason})
            else:
                choices.append({"index": index, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason})
        return self._envelope(self.object, choices, usage=usage(outs))

    def chunks(self, index: int, out: RequestOutput, first: bool) -> list[str]:
        """SSE `data:` lines for one (coalesced) engine delta of choice `index`."""
        lines = []
        if self.kind == "chat" and first:
            delta = {"role": "assistant", "content": ""}
            lines.append(self._chunk({"index": index, "delta": delta, "logprobs": None, "finish_reason": None}))
        if out.text or out.finished:
            if self.kind == "chat":
                delta = {"content": out.text} if out.text else {}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": out.finish_reason}
            else:
                choice = {"index": index, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
            lines.append(self._chunk(choice))
        return lines

    def usage_chunk(self, outs: list[RequestOutput]) -> str:
        return sse(self._envelope(self.chunk_object, [], usage=usage(outs)))

    def _chunk(self, choice: dict) -> str:
        payload = self._envelope(self.chunk_object, [choice])
        if self.include_usage:
            payload["usage"] = None
        return sse(payload)


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# routes ---------------------------------------------------------------------------------------
def routes(pipeline: Pipeline):
    from app.api.server import Adapter, request_id

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
        return {"object": "list", "data": data}

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str):
        return model_card(model, pipeline.resolve_any(model))

    @router.post("/tokenize")
    async def tokenize(request: Request, body: TokenizeRequest):
        tokens, max_model_len = await pipeline.tokenize(body.to_internal(request_id(request)))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return {"prompt": await pipeline.detokenize(body.model, body.tokens)}

    return Adapter(router, lambda err: JSONResponse(error_body(err), status_code=err.status))


async def respond(pipeline: Pipeline, rid: str, kind: str, body: ChatCompletionRequest | CompletionRequest):
    """One chat or text completion, whole or streamed (also serves Azure's deployment routes)."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    builder = ResponseBuilder(kind, ("chatcmpl-" if kind == "chat" else "cmpl-") + rid, body.model, include_usage)
    req = body.to_internal(rid)
    if not body.stream:
        return builder.complete(await pipeline.complete(req))
    stream = await pipeline.stream(req)  # errors before the first token still get a status code
    return StreamingResponse(_sse(builder, stream, req.n), media_type="text/event-stream")


def model_card(model_id: str, name: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "conduit", "root": name}


async def _sse(builder: ResponseBuilder, stream, n: int):
    last: dict[int, RequestOutput] = {}  # each choice's latest delta (it carries the running counts)
    try:
        async for index, out in stream:
            for line in builder.chunks(index, out, first=index not in last):
                yield line
            last[index] = out
        if builder.include_usage:
            yield builder.usage_chunk([last[i] for i in range(n)])
    except Exception as e:  # after the 200 the status is sent: report in the stream, never cut silently
        err = e if isinstance(e, ConduitError) else ConduitError(f"generation failed: {e}", 500, "server_error")
        yield sse(error_body(err))
    finally:
        await stream.aclose()
    yield SSE_DONE
