"""One batch's input file read as the Batch API reads it, and one line answered as its route would
answer it. Lines are parsed by `conduit batch`'s own reader (app/batch/lines.py) and answered in its
output line format; a body the route refuses gets the route's error as its answer (error file)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.api.errors import ConduitError, invalid, stream_failure
from app.api.pipeline import Pipeline
from app.api.server import validation_error
from app.api.wire.embeddings import EmbeddingRequest, embedding_response
from app.api.wire.openai import ChatCompletionRequest, CompletionRequest, respond
from app.api.wire.responses import new_response
from app.api.wire.responses_items import input_items, to_messages
from app.api.wire.responses_request import ResponsesRequest
from app.api.wire.responses_stream import ResponseOutput
from app.batch.lines import BatchLine, LineError, parse_line, response_line
from app.batch.requests import refusal_line

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/embeddings": "embedding",
             "/v1/responses": "response"}
BODY_MODELS = {"chat": ChatCompletionRequest, "completion": CompletionRequest, "embedding": EmbeddingRequest,
               "response": ResponsesRequest}
MAX_LINES = 50_000  # OpenAI's limit on one batch's requests
MAX_ERRORS = 100  # validation errors reported (the first ones)


@dataclass
class Parsed:
    lines: list[BatchLine]  # index: the line's position (its index among the file's non-blank lines)
    errors: list[dict]  # OpenAI's batch `errors.data` entries; any of them fails the batch


def read_input(data: bytes, endpoint: str) -> Parsed:
    lines, errors, seen = [], [], set()

    def error(code: str, message: str, number: int | None, param: str | None = None) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": number})

    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text, utf8 = raw.decode(), True
        except UnicodeDecodeError:
            text, utf8 = raw.decode(errors="replace"), False
        parsed = parse_line(text, utf8, urls=(endpoint,))
        if isinstance(parsed, LineError):
            error(parsed.code, parsed.message, number, "url" if parsed.code == "invalid_url" else None)
        elif parsed.custom_id in seen:
            error("duplicate_custom_id", f"custom_id {parsed.custom_id!r} is used by an earlier line", number,
                  "custom_id")
        else:
            seen.add(parsed.custom_id)
            lines.append(parsed)
    if not lines and not errors:
        error("empty_file", "The input file has no requests", None)
    if len(lines) > MAX_LINES:
        error("too_many_requests", f"A batch holds at most {MAX_LINES} requests, this file has {len(lines)}", None)
    return Parsed(lines, errors)


async def answer(pipeline: Pipeline, line: BatchLine) -> tuple[int, str]:
    """(its status code, its output line): the route's answer or refusal, never an exception."""
    kind = ENDPOINTS[line.url]
    request_id = uuid.uuid4().hex
    try:
        body = _body(kind, line.body)
        if kind == "response":
            result = await _response(pipeline, request_id, body)
        elif kind == "embedding":
            vectors, tokens = await pipeline.embed(body.model, body.inputs(), body.dimensions)
            result = embedding_response(body.model, vectors, tokens, body.encoding_format)
        else:
            result = await respond(pipeline, request_id, kind, body)
        if isinstance(result, JSONResponse):
            result = json.loads(result.body)
        return 200, response_line(line.custom_id, 200, request_id, result)
    except Exception as e:  # CancelledError is no Exception: a cancelled batch leaves the line unanswered
        err = stream_failure(e)
        return err.status, refusal_line(line.custom_id, err, request_id)


def _body(kind: str, raw: dict):
    try:
        body = BODY_MODELS[kind].model_validate(raw)
    except ValidationError as e:
        raise validation_error(RequestValidationError(e.errors())) from None
    if getattr(body, "stream", False):
        raise ConduitError("stream is not supported in a batch: each line gets one whole response", param="stream")
    if kind == "response":
        body.check()
        for field in ("background", "previous_response_id"):
            if getattr(body, field):
                raise invalid(f"{field} is not supported in a batch", field, "unsupported_parameter")
    return body


async def _response(pipeline: Pipeline, request_id: str, body: ResponsesRequest) -> dict:
    """A Responses API line: answered as POST /v1/responses answers, not stored (a batch's output
    file holds it)."""
    tools = body.function_tools()
    items = input_items(body.input)
    if not items:
        raise invalid("input must not be empty", "input")
    req = body.to_internal(request_id, to_messages(items, body.instructions), tools)
    output = ResponseOutput(new_response(body, tools, "in_progress"), req)
    (out,) = await pipeline.complete(req)
    output.feed(out)
    return output.response
