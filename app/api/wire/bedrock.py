"""Amazon Bedrock Runtime wire format (Converse API): `POST /model/{modelId}/converse` and
`/model/{modelId}/converse-stream`, as boto3's `bedrock-runtime` client calls them.

Requests become a chat `GenerateRequest`; results come back as Converse's JSON, or as AWS
event-stream messages (app/api/wire/eventstream.py). Errors carry `x-amzn-ErrorType`, which is what makes
boto3 raise its own exception classes (`client.exceptions.ValidationException`, ...). Any SigV4
signature is accepted: authentication is not this adapter's job."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.adapter import Adapter, adapter, request_id
from app.api.bounds import PositiveCount, real
from app.api.errors import ConduitError, stream_failure
from app.api.pipeline import Pipeline
from app.api.protocol import GenerateRequest
from app.api.wire import eventstream
from app.config import AppConfig
from app.engine.engine import RequestOutput
from app.engine.sampling_params import SamplingParams

log = logging.getLogger("ray.serve")

# ConduitError status -> the Bedrock exception boto3 raises for it
ERROR_TYPES = {
    400: "ValidationException",
    401: "AccessDeniedException",  # no or a wrong API key (what Bedrock answers for a bad API key)
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    413: "ValidationException",
    429: "ThrottlingException",
    503: "ServiceUnavailableException",
    504: "ModelTimeoutException",  # the ingress's deadline passed
}
# by ConduitError code: the model's replica was lost mid-request, or its deadline passed while the model
# had no running replica (scaled to zero, still starting); boto3 retries ModelNotReadyException itself
ERROR_CODES = {"replica_unavailable": "ModelNotReadyException", "model_not_ready": "ModelNotReadyException"}
# ... and the members of ConverseStream's event union for errors after the stream began
STREAM_ERROR_TYPES = {400: "validationException", 429: "throttlingException", 503: "serviceUnavailableException"}


class _Strict(BaseModel):
    # fields we do not implement (tools, guardrails, images) are refused by name, not ignored
    model_config = ConfigDict(extra="forbid")


class TextBlock(_Strict):
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        if isinstance(data, dict) and "text" not in data:
            raise ValueError(f"only text content blocks are supported, not {', '.join(data) or 'an empty block'}")
        return data


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: list[TextBlock] = Field(min_length=1)


class SystemBlock(_Strict):
    text: str = Field(min_length=1)


class InferenceConfig(_Strict):
    maxTokens: PositiveCount | None = None
    temperature: real(ge=0, le=1) | None = None
    topP: real(gt=0, le=1) | None = None
    stopSequences: list[Annotated[str, Field(min_length=1)]] = []  # count capped by ingress.input_limits


class ConverseRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    system: list[SystemBlock] = []
    inferenceConfig: InferenceConfig = InferenceConfig()

    def to_internal(self, request_id: str, model: str, stream: bool) -> GenerateRequest:
        config = self.inferenceConfig
        messages = [{"role": "system", "content": "\n".join(b.text for b in self.system)}] if self.system else []
        messages += [{"role": m.role, "content": "".join(b.text for b in m.content)} for m in self.messages]
        sampling = SamplingParams(
            max_tokens=config.maxTokens or 1,
            temperature=1.0 if config.temperature is None else config.temperature,
            top_p=1.0 if config.topP is None else config.topP,
            stop=list(config.stopSequences),
        )
        return GenerateRequest(request_id, model, sampling, messages=messages,
                               max_tokens_given=config.maxTokens is not None, stream=stream)


# responses ------------------------------------------------------------------------------------
def stop_reason(out: RequestOutput) -> str:
    if out.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if isinstance(out.stop_reason, str) else "end_turn"


def usage(out: RequestOutput) -> dict:
    return {"inputTokens": out.num_prompt_tokens, "outputTokens": out.num_output_tokens,
            "totalTokens": out.num_prompt_tokens + out.num_output_tokens}


def elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def converse_response(out: RequestOutput, started: float) -> dict:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": out.text}]}},
        "stopReason": stop_reason(out),
        "usage": usage(out),
        "metrics": {"latencyMs": elapsed_ms(started)},
    }


def error_response(err: ConduitError) -> JSONResponse:
    default = "ValidationException" if err.status < 500 else "InternalServerException"
    error_type = ERROR_CODES.get(err.code) or ERROR_TYPES.get(err.status, default)
    return JSONResponse({"message": err.message}, status_code=err.status,
                        headers={**err.headers, "x-amzn-ErrorType": error_type})


async def without_running_replica(model: str) -> bool:
    """Whether Serve reports no RUNNING replica of `model`'s deployment in this application (False
    when its status cannot be read: the error at hand then stands)."""
    from ray import serve

    from app.config import deployment_name

    try:
        status = await asyncio.to_thread(serve.status)  # a controller call: only on the error path
        app = status.applications[serve.get_replica_context().app_name]
        return not app.deployments[deployment_name("Model", model)].replica_states.get("RUNNING")
    except Exception as e:
        log.warning("could not read Serve's status for %s: %r", model, e)
        return False


@asynccontextmanager
async def not_ready_while_cold(pipeline: Pipeline, model_id: str):
    """A deadline that passed while the model had no running replica becomes ModelNotReadyException
    (429), as Bedrock answers for a model it is still restoring, so that boto3 retries by itself;
    a deadline passed on a running model stays ModelTimeoutException."""
    try:
        yield
    except ConduitError as err:
        if err.code != "deadline_exceeded" or not await without_running_replica(pipeline.models.resolve(model_id)):
            raise
        raise ConduitError("Model is not ready for inference: its replica is still starting (from zero replicas, "
                           "or after a restart). "
                           "Wait and try your request again.", 429, "server_error", None, "model_not_ready") from None


async def converse_events(stream, started: float):
    """messageStart, one contentBlockDelta per engine delta, contentBlockStop, messageStop, metadata."""
    yield eventstream.event("messageStart", {"role": "assistant"})
    last = None
    try:
        async for _, out in stream:
            if out.text:
                yield eventstream.event("contentBlockDelta", {"delta": {"text": out.text}, "contentBlockIndex": 0})
            last = out
    except Exception as e:  # after the 200 the status is sent: an exception event is how Bedrock reports it
        err = stream_failure(e)
        yield eventstream.exception(STREAM_ERROR_TYPES.get(err.status, "internalServerException"), err.message)
        return
    finally:
        await stream.aclose()
    yield eventstream.event("contentBlockStop", {"contentBlockIndex": 0})
    yield eventstream.event("messageStop", {"stopReason": stop_reason(last)})
    yield eventstream.event("metadata", {"usage": usage(last), "metrics": {"latencyMs": elapsed_ms(started)}})


# routes ---------------------------------------------------------------------------------------
@adapter
def routes(pipeline: Pipeline, config: AppConfig):
    router = APIRouter()

    @router.post("/model/{model_id:path}/converse")
    async def converse(request: Request, model_id: str, body: ConverseRequest):
        started = time.monotonic()
        rid = request_id(request)
        async with not_ready_while_cold(pipeline, model_id):
            (out,) = await pipeline.complete(body.to_internal(rid, model_id, stream=False))
        return JSONResponse(converse_response(out, started), headers={"x-amzn-RequestId": rid})

    @router.post("/model/{model_id:path}/converse-stream")
    async def converse_stream(request: Request, model_id: str, body: ConverseRequest):
        started = time.monotonic()
        rid = request_id(request)
        async with not_ready_while_cold(pipeline, model_id):  # early errors get a status
            stream = await pipeline.stream(body.to_internal(rid, model_id, stream=True))
        return StreamingResponse(converse_events(stream, started), media_type="application/vnd.amazon.eventstream",
                                 headers={"x-amzn-RequestId": rid})

    return Adapter(router, error_response, prefixes=("/model/",))
