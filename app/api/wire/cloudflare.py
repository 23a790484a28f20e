"""Cloudflare Workers AI wire format: `POST /client/v4/accounts/{account_id}/ai/run/{model}`, text
generation with `{"prompt"}` or `{"messages"}`, answered in Cloudflare's envelope
`{"result": {"response", "usage"}, "success", "errors", "messages"}` or, with `"stream": true`, as
its SSE (`data: {"response": "..."}` lines, the last with `usage`, then `data: [DONE]`).

Model names: a configured model id (name or alias), optionally in Cloudflare's catalog form
`@cf/<id>` (or `@hf/<id>`); the SDK sends the slashes %2F-encoded. Like Workers AI, a `prompt` is
rendered with the model's chat template as one user message unless `raw` is true; the defaults are
Workers AI's (`max_tokens` 256, `temperature` 0.6). The account id is accepted and not checked."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app.api.adapter import Adapter, adapter, request_id
from app.api.bounds import PositiveCount, real, zero_or_usable_penalty
from app.api.errors import ConduitError, stream_failure
from app.api.pipeline import Pipeline
from app.api.protocol import GenerateRequest
from app.api.wire.openai import SSE_DONE, sse
from app.config import AppConfig
from app.engine.engine import RequestOutput
from app.engine.sampling_params import SamplingParams

PREFIX = "/client/v4/accounts/"
CATALOG_NAMESPACES = ("@cf/", "@hf/")
# Workers AI's internal error codes for the statuses we answer (its published error table; 10000
# is the Cloudflare API's authentication error); invalid input is 5006, as Workers AI answers schema
# violations; other 5xx keep their status
ERROR_CODES = {401: 10000, 404: 5007, 408: 3007, 413: 3006, 429: 3040, 503: 3040, 504: 3007}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1)] | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    raw: bool = False  # prompt only: no chat template
    max_tokens: PositiveCount = 256
    temperature: real(ge=0, le=5) = 0.6
    top_p: real(gt=0, le=1) | None = None
    top_k: Annotated[int, Field(ge=1, le=50)] | None = None
    seed: Annotated[int, Field(ge=1, le=9999999999)] | None = None
    # Workers AI documents [0, 2]; 0 reads as "unset" (1.0), and what lies between is bounded below
    repetition_penalty: Annotated[float, Field(allow_inf_nan=False, le=2),
                                  AfterValidator(zero_or_usable_penalty)] | None = None
    frequency_penalty: real(ge=-2, le=2) | None = None
    presence_penalty: real(ge=-2, le=2) | None = None
    ignore_eos: bool = False
    stream: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> RunRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.raw and self.messages is not None:
            raise ValueError("raw applies to prompt, not messages")
        return self

    def to_internal(self, request_id: str, model: str) -> GenerateRequest:
        messages = [m.model_dump() for m in self.messages] if self.messages else None
        if self.prompt is not None and not self.raw:
            messages = [{"role": "user", "content": self.prompt}]
        return GenerateRequest(
            request_id=request_id,
            model=model,
            sampling=SamplingParams(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p or 1.0,
                top_k=self.top_k or 0,
                seed=self.seed,
                repetition_penalty=self.repetition_penalty or 1.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                presence_penalty=self.presence_penalty or 0.0,
                ignore_eos=self.ignore_eos,
            ),
            prompt=None if messages else self.prompt,
            messages=messages,
            stream=self.stream,
        )


def model_id(path_model: str) -> str:
    for namespace in CATALOG_NAMESPACES:
        if path_model.startswith(namespace):
            return path_model[len(namespace):]
    return path_model


# responses ------------------------------------------------------------------------------------
def error_code(status: int) -> int:
    return ERROR_CODES.get(status, 5006 if status < 500 else status)


def error_response(err: ConduitError) -> JSONResponse:
    code = error_code(err.status)
    status = 400 if err.status == 404 else err.status  # Workers AI answers an unknown model with 400
    body = {"result": None, "success": False, "errors": [{"code": code, "message": err.message}], "messages": []}
    return JSONResponse(body, status_code=status)


def usage(out: RequestOutput) -> dict:
    prompt, completion = out.num_prompt_tokens, out.num_output_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def response_events(stream):
    """Cloudflare's SSE: one event per delta, the last with usage, then [DONE]."""
    try:
        async for _, out in stream:
            if out.text:
                yield sse({"response": out.text})
            if out.finished:
                yield sse({"response": "", "usage": usage(out)})
    except Exception as e:  # after the 200 the status is sent: report in the stream, never cut silently
        err = stream_failure(e)
        yield sse({"errors": [{"code": error_code(err.status), "message": err.message}]})
    finally:
        await stream.aclose()
    yield SSE_DONE


# routes ---------------------------------------------------------------------------------------
@adapter
def routes(pipeline: Pipeline, config: AppConfig):
    router = APIRouter()

    @router.post(PREFIX + "{account_id}/ai/run/{model:path}")
    async def run(request: Request, account_id: str, model: str, body: RunRequest):
        req = body.to_internal(request_id(request), model_id(model))
        if not body.stream:
            [out] = await pipeline.complete(req)
            return {"result": {"response": out.text, "usage": usage(out)}, "success": True, "errors": [], "messages": []}
        stream = await pipeline.stream(req)  # errors before the first token still get a status code
        return StreamingResponse(response_events(stream), media_type="text/event-stream")

    return Adapter(router, error_response, prefixes=(PREFIX,))
