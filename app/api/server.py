"""The ingress's HTTP app: one FastAPI app with every wire format's routes mounted on it.

Each wire adapter (app/api/wire/: openai.py, anthropic.py, ...) registers an `Adapter` builder
(app/api/adapter.py): its routes, built around the shared `Pipeline`, and how its errors look on the
wire. Errors from any layer are `ConduitError`s; the
handlers here render them in the shape of the API whose path was called."""

from __future__ import annotations

import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import access_log, metrics
from app.api.adapter import build_adapters
from app.api.errors import ConduitError, internal_error
from app.api.gate import (
    Admit,
    Authenticate,
    Gate,
    InFlightCap,
    ingress_capacity,
    route_path,
)
from app.api.input_limits import BodyGuard, CloseUnread
from app.api.pipeline import Pipeline
from app.config import AppConfig

REQUEST_ID_HEADER = "x-request-id"


def validation_error(exc: RequestValidationError) -> ConduitError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return ConduitError(f"We could not parse the JSON body of your request: {err.get('msg')}", param=None)
    if err.get("type") == "extra_forbidden":
        return ConduitError(f"Unrecognized request argument supplied: {param}", param=param, code="unsupported_parameter")
    if param is None:  # a rule over the whole body (a model validator), no one field to name
        return ConduitError(f"Invalid request body: {err.get('msg')}")
    return ConduitError(f"Invalid value for '{param}': {err.get('msg')}", param=param)


class RequestContext:
    """ASGI middleware, outside the key check: gives each HTTP request its id (the client's
    x-request-id, or a new one) and its access record, answers a declared body over its path's limit
    with a 413 before anything reads it, and closes the record once the response's last byte is sent
    (or the app ends without sending it). Plain ASGI, not Starlette's `BaseHTTPMiddleware`, which
    carries every chunk of a streamed body through a memory stream and a task of its own.

    No x-request-id on responses here: Serve already echoes it on every response (the client's, or
    the one it made and passed in), so setting it too would send it twice."""

    def __init__(self, app: ASGIApp, log_prompts: bool, max_bytes: int, path_limits: dict[str, int], reject):
        self.app, self.log_prompts, self.reject = app, log_prompts, reject
        self.max_bytes, self.path_limits = max_bytes, path_limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        request.state.request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        record = access_log.start(request, self.log_prompts)
        length = request.headers.get("content-length")
        limit = self.path_limits.get(request.url.path, self.max_bytes)
        if length is not None and (not length.isdigit() or int(length) > limit):
            err = ConduitError(f"Request body of {length} bytes exceeds the limit of {limit} bytes",
                               413, code="request_too_large")
            response = self.reject(request, err)
            access_log.finish(record, scope, response.status_code)
            return await response(scope, receive, send)
        status = None
        closed = False

        async def send_then_close(message: Message) -> None:
            nonlocal status, closed
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                closed = True
                access_log.finish(record, scope, status)

        try:
            await self.app(scope, receive, send_then_close)
        finally:
            if status is not None and not closed:  # the body was cut short (client gone, an error)
                access_log.finish(record, scope, status)


def build_api(pipeline: Pipeline, config: AppConfig, host: str, max_ongoing_requests: int) -> FastAPI:
    """`host`: the address the front binds (keyless servers refuse a public one); `max_ongoing_requests`:
    the ingress deployment's own (the in-flight cap is derived from it)."""
    adapters = build_adapters(pipeline, config)
    default = next(a for a in adapters if a.default)  # OpenAI's error shape wherever no adapter claims the path

    def error_response(request: Request, err: ConduitError) -> Response:
        path = route_path(request)
        adapter = next((a for a in adapters if path in a.paths or any(path.startswith(p) for p in a.prefixes)), default)
        response = adapter.error_response(err)
        response.headers.update(getattr(err, "headers", None) or {})  # e.g. Retry-After
        return response

    api = FastAPI(title="Conduit", description="LLM inference on Ray Serve: OpenAI-compatible and more")
    for adapter in adapters:
        api.include_router(adapter.router)

    @api.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return error_response(request, validation_error(exc))

    @api.exception_handler(ConduitError)
    async def on_conduit_error(request: Request, exc: ConduitError):
        return error_response(request, exc)

    # FastAPI's own 4xx (a body that is not UTF-8, an unknown path or method): the API's shape too,
    # not Starlette's {"detail": ...}
    @api.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        return error_response(request, ConduitError(str(exc.detail), exc.status_code, headers=exc.headers))

    # A bug or an unmapped failure: still a 500 in the API's own shape, naming the exception (clients and
    # CI logs then say what went wrong); Starlette re-raises it after this, so the traceback is logged.
    @api.exception_handler(Exception)
    async def on_unexpected_error(request: Request, exc: Exception):
        return error_response(request, internal_error(exc))

    # Outermost last. A call passes: the access log, the key check (refused calls are answered at
    # once: nothing counts them or reads their body), the capacity check, rate limits and deadline
    # (after capacity, so a call refused for capacity costs its key nothing), then the body read.
    gate = Gate.from_config(config, host)
    max_bytes = config.ingress.max_request_bytes
    path_limits = {"/v1/files": config.store.max_file_bytes}  # uploads: batch input files are large
    api.add_middleware(BodyGuard, max_bytes=max_bytes, timeout_s=config.ingress.body_timeout_s,
                       reject=error_response, path_limits=path_limits)
    api.add_middleware(Admit, gate=gate, reject=error_response)
    api.add_middleware(InFlightCap, limit=ingress_capacity(max_ongoing_requests), reject=error_response)
    api.add_middleware(Authenticate, gate=gate, reject=error_response)
    api.add_middleware(RequestContext, log_prompts=config.logging.log_prompts, max_bytes=max_bytes,
                       path_limits=path_limits, reject=error_response)

    # CORS stays off unless configured; outside the key check, so preflights need no key
    if config.ingress.cors_origins:
        api.add_middleware(CORSMiddleware, allow_origins=config.ingress.cors_origins,
                           allow_methods=["*"], allow_headers=["*"], expose_headers=["*"])
    api.add_middleware(CloseUnread)  # outermost: sees every answer, refusals by any layer included

    @api.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok"}

    cluster_metrics = metrics.SharedScrape()

    @api.api_route("/metrics", methods=["GET", "HEAD"], include_in_schema=False)
    async def prometheus_metrics():
        """Every replica's metrics in the cluster, vLLM's and Conduit's names (app/metrics.py)."""
        return Response(await cluster_metrics.get(), media_type=CONTENT_TYPE_LATEST)

    return api
