"""Vertex AI custom-container contract: `POST $AIP_PREDICT_ROUTE` with `{"instances", "parameters"}`
answered with `{"predictions"}`, and `GET $AIP_HEALTH_ROUTE`.

Instances are what Vertex's Model Garden vLLM container accepts: `{"prompt": ...}` (prediction: the
string "Prompt:\\n<prompt>\\nOutput:\\n<text>", or only the text with `"raw_response": true`) or
`{"messages": [...]}` (optionally `"@requestFormat": "chatCompletions"`; prediction: an OpenAI
chat.completion object), each with vLLM's sampling fields (`max_tokens`, `temperature`, `top_p`,
`top_k`, `stop`, ...). `parameters` gives defaults for every instance. Vertex's client sends every
number as a float, so integral floats (16.0) are accepted for integer fields.

The routes are read from the environment when the ingress replica builds its app, so AIP_* must be
set where Ray runs (Vertex sets them in the container; `conduit run` passes its environment on)."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.api.adapter import Adapter, adapter, request_id
from app.api.errors import ConduitError
from app.api.pipeline import Pipeline
from app.api.protocol import GenerateRequest
from app.api.wire.openai import ChatMessage, ResponseBuilder, StreamOptions, _Request
from app.auth import HEALTH_PATH
from app.config import AppConfig
from app.engine.engine import RequestOutput

DEFAULT_PREDICT_ROUTE = "/predict"
# HTTP status -> google.rpc.Code name, the `status` of a Google API error
RPC_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              408: "DEADLINE_EXCEEDED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
              500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class Instance(_Request):
    """One instance, `parameters` merged in; the sampling fields and their checks are the OpenAI route's."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str | None = None  # Conduit extension: a configured model other than the first
    prompt: Annotated[str, Field(min_length=1)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    request_format: Literal["chatCompletions"] | None = Field(None, alias="@requestFormat")
    raw_response: bool = False
    n: Literal[1] = 1  # one prediction per instance
    stream: Literal[False] = False  # predict answers once

    @model_validator(mode="after")
    def _one_input(self) -> Instance:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.request_format and self.messages is None:
            raise ValueError("@requestFormat chatCompletions needs messages")
        return self

    def to_internal(self, request_id: str, default_model: str) -> GenerateRequest:
        messages = None if self.messages is None else [{"role": m.role, "content": m.text()} for m in self.messages]
        return GenerateRequest(request_id, self.model or default_model, self.sampling(self.max_tokens),
                               prompt=self.prompt, messages=messages, max_tokens_given=self.max_tokens is not None)


Instance.model_rebuild(_types_namespace={"StreamOptions": StreamOptions})  # an inherited forward reference


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[dict] = Field(min_length=1)  # at most ingress.input_limits.max_n: see check_instance_count
    parameters: dict = {}


def check_instance_count(count: int, max_n: int) -> None:
    """Each instance is one engine sequence: together they may not ask for more than n may."""
    if count > max_n:
        raise ConduitError(f"Invalid value for 'instances': at most {max_n} instances per request (this "
                           f"server's ingress.input_limits.max_n); got {count}", 400, param="instances")


def parse_instance(index: int, instance: dict, parameters: dict) -> Instance:
    """The instance with `parameters` as defaults; a bad field is named where it was given."""
    try:
        return Instance.model_validate({**parameters, **instance})
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        where = f"parameters.{field}" if err["loc"] and err["loc"][0] in parameters.keys() - instance.keys() \
            else f"instances[{index}]" + (f".{field}" if field else "")
        raise ConduitError(f"Invalid value for '{where}': {err['msg']}", 400, param=where) from None


def prediction(instance: Instance, out: RequestOutput, response_id: str, model: str) -> str | dict:
    if instance.messages is not None:
        return ResponseBuilder("chat", response_id, model, include_usage=False).complete([out])
    return out.text if instance.raw_response else f"Prompt:\n{instance.prompt}\nOutput:\n{out.text}"


def error_response(err: ConduitError) -> JSONResponse:
    status = RPC_STATUS.get(err.status, "INTERNAL" if err.status >= 500 else "FAILED_PRECONDITION")
    return JSONResponse({"error": {"code": err.status, "message": err.message, "status": status}},
                        status_code=err.status)


@adapter
def routes(pipeline: Pipeline, config: AppConfig):
    predict_route = os.environ.get("AIP_PREDICT_ROUTE") or DEFAULT_PREDICT_ROUTE
    health_route = os.environ.get("AIP_HEALTH_ROUTE") or HEALTH_PATH  # server.py's own /health when unset
    default_model = next(iter(pipeline.models.ids.values()))  # the first configured model
    router = APIRouter()

    async def predict(request: Request, body: PredictRequest):
        rid = request_id(request)
        check_instance_count(len(body.instances), pipeline.limits.max_n)
        instances = [parse_instance(i, inst, body.parameters) for i, inst in enumerate(body.instances)]
        requests = [inst.to_internal(f"{rid}-{i}", default_model) for i, inst in enumerate(instances)]
        outputs = await pipeline.complete_each(requests)
        return {"predictions": [prediction(inst, out, f"chatcmpl-{req.request_id}", req.model)
                                for inst, req, out in zip(instances, requests, outputs)]}

    async def health():  # 200 once this ingress replica serves (Serve routes to it only then)
        return {"status": "ok"}

    router.add_api_route(predict_route, predict, methods=["POST"])
    if health_route != HEALTH_PATH:
        router.add_api_route(health_route, health, methods=["GET", "HEAD"])  # as /health answers
    return Adapter(router, error_response, paths=(predict_route, health_route))
