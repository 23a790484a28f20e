"""A batch line's body as the online route reads it, and its answer as the route writes it: the
routes' own request models validate the body (the OpenAI adapter's; the embeddings adapter's), and
the OpenAI adapter's `ResponseBuilder` builds a generation's response body, so a batch answer is the
chat (or completions) route's answer, byte for byte but for ids and timestamps (embeddings lines:
app/batch/embedding_worker.py). Refusals are `ConduitError`s, rendered as the route renders them."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.api.errors import ConduitError
from app.api.lora_table import Target
from app.api.protocol import GenerateRequest
from app.api.server import validation_error
from app.api.wire.embeddings import EmbeddingRequest
from app.api.wire.openai import ChatCompletionRequest, CompletionRequest, ResponseBuilder, error_body
from app.batch.lines import BatchLine, response_line
from app.config import IngressConfig
from app.engine.engine import RequestOutput

BODY_MODELS = {"chat": ChatCompletionRequest, "completion": CompletionRequest, "embedding": EmbeddingRequest}
ID_PREFIX = {"chat": "chatcmpl-", "completion": "cmpl-"}


@dataclass
class LineRequest:
    """A line whose body the route would take: the parsed body and its internal request."""

    line: BatchLine
    request_id: str
    body: ChatCompletionRequest | CompletionRequest
    req: GenerateRequest
    target: Target  # the model (and LoRA adapter) it runs on


def to_request(line: BatchLine, target: Callable[[str], Target]) -> LineRequest:
    """Validate `line`'s body as its route does (ConduitError naming the field when it would not).
    `target`: what a model id runs on in this job (its model, or one of its LoRA adapters; a 404
    ConduitError for any other id)."""
    body = route_body(line)
    runs_on = target(body.model)
    request_id = uuid.uuid4().hex
    req = body.to_internal(request_id)
    req.model = runs_on.model
    return LineRequest(line, request_id, body, req, runs_on)


def check_size(text: str, ingress: IngressConfig) -> None:
    """The route's 413 for a line past `ingress.max_request_bytes`."""
    if len(text.encode()) > ingress.max_request_bytes:
        raise ConduitError(f"Request body exceeds the limit of {ingress.max_request_bytes} bytes", 413,
                           code="request_too_large")


def route_body(line: BatchLine):
    """`line`'s body, validated by its route's own request model (a ConduitError naming the field)."""
    try:
        body = BODY_MODELS[line.kind].model_validate(line.body)
    except ValidationError as e:
        raise validation_error(RequestValidationError(e.errors())) from None
    if getattr(body, "stream", False):
        raise ConduitError("stream is not supported in a batch: each line gets one whole response", param="stream")
    return body


def answer_line(request: LineRequest, outs: list[RequestOutput], echo: str | None) -> str:
    """The output line of a finished request: `outs` one per choice, in choice order; `echo`: the
    prompt's text for completions that asked for `echo`."""
    kind = request.line.kind
    builder = ResponseBuilder(kind, ID_PREFIX[kind] + request.request_id, request.body.model, False, request.req, echo)
    return response_line(request.line.custom_id, 200, request.request_id, builder.complete(outs))


def refusal_line(custom_id: str, err: ConduitError, request_id: str | None = None) -> str:
    """The output line of a request the route would refuse: its status code and error body."""
    return response_line(custom_id, err.status, request_id or uuid.uuid4().hex, error_body(err))
