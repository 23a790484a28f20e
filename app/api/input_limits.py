"""Input limits: the caps of `ingress.input_limits`, checked in the `Pipeline` so that every wire
format gets them, and `BodyGuard`, which every POST body passes before its route."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import ConduitError, invalid
from app.api.protocol import GenerateRequest
from app.config import InputLimits
from app.engine.sampling_params import SamplingParams


def check_generate(req: GenerateRequest, limits: InputLimits) -> None:
    """400 naming the field (OpenAI's name for it) when a generation request asks for too much."""
    _at_most(len(req.messages or ()), limits.max_messages, "messages", "messages")
    _at_most(req.n, limits.max_n, "n", "choices")
    stop = req.sampling.stop
    _at_most(len(stop), limits.max_stop_sequences, "stop", "stop sequences")
    for text in stop:
        if not 0 < len(text) <= limits.max_stop_length:
            raise invalid(f"stop: each stop sequence must be non-empty and at most {limits.max_stop_length} characters",
                          "stop")
    logprobs_param = "top_logprobs" if req.messages is not None else "logprobs"
    for alternatives in (req.sampling.logprobs, req.sampling.prompt_logprobs):
        if alternatives is not None:
            _at_most(alternatives, limits.max_top_logprobs, logprobs_param, "alternatives per token")
    _at_most(len(req.tools), limits.max_tools, "tools", "tools")


def cap_max_tokens(req: GenerateRequest, sampling: SamplingParams, limits: InputLimits) -> None:
    """After tokenizing, so that the context window's error (which says more) comes first: a given
    max_tokens past the cap is a 400; an unset one (the rest of the window) is lowered to the cap."""
    if req.max_tokens_given:
        _at_most(sampling.max_tokens, limits.max_tokens, "max_tokens", "tokens to generate")
    else:
        sampling.max_tokens = min(sampling.max_tokens, limits.max_tokens)


def check_embedding_inputs(count: int, limits: InputLimits) -> None:
    _at_most(count, limits.max_embedding_inputs, "input", "inputs")


def check_embedding_request(inputs: list[str] | list[list[int]], limits: InputLimits) -> None:
    """An embeddings request's inputs (online and in `conduit batch`): some, none of them empty, not too many."""
    if not inputs or any(len(x) == 0 for x in inputs):
        raise invalid("input must not be empty, nor hold an empty string or token list", "input")
    check_embedding_inputs(len(inputs), limits)


def _at_most(value: int, cap: int, param: str, what: str) -> None:
    if value > cap:
        raise invalid(f"{param}: at most {cap} {what} per request (this server's ingress.input_limits); got {value}",
                      param)


# `\uD800`-`\uDFFF` escapes: JSON allows them, but an unpaired one is no Unicode text at all
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class BodyGuard:
    """ASGI middleware: reads a request body before its route does, at most `max_bytes` of it (413
    beyond, also for a chunked body that announced no length) within `timeout_s` (408 later: a slow
    sender must not hold a slot), and refuses JSON holding an unpaired UTF-16 surrogate. Python
    parses that into a str that fails wherever the text goes next (the tokenizer, a log line, the
    response echoing it): a 500 for what is the client's fault. The body is then replayed to the
    app unchanged."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float,
                 reject: Callable[[Request, ConduitError], Response], path_limits: dict[str, int] | None = None):
        """`path_limits`: paths whose bodies may be larger (or must be smaller) than `max_bytes`."""
        self.app, self.max_bytes, self.timeout_s, self.reject = app, max_bytes, timeout_s, reject
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            limit = self.path_limits.get(scope["path"], self.max_bytes)
            body = await asyncio.wait_for(self._read(receive, limit), self.timeout_s)
        except TimeoutError:
            body = ConduitError(f"The request body did not arrive within {self.timeout_s:g} s", 408,
                                code="request_timeout")
        if body is None:  # the client went away before sending it all
            return
        error = body if isinstance(body, ConduitError) else surrogate_error(body)
        if error is not None:
            return await self.reject(Request(scope), error)(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive, max_bytes: int) -> bytes | ConduitError | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                return ConduitError(f"Request body exceeds the limit of {max_bytes} bytes", 413,
                                    code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)


class CloseUnread:
    """ASGI middleware, outermost: a response sent before its request's body was read whole (a
    refusal: 401, 405, 408, 413, 503) says `connection: close`, so the HTTP server in front (Ray
    Serve's proxy, uvicorn) closes the connection. Without it, uvicorn keeps reading the unwanted
    body, with no time limit while the client trickles it: the client would hold the connection."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", ())) if scope["type"] == "http" else {}
        if headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)
        body_read = False

        async def receive_and_note():
            nonlocal body_read
            message = await receive()
            body_read = body_read or (message["type"] == "http.request" and not message.get("more_body"))
            return message

        async def send_closing(message):
            if message["type"] == "http.response.start" and not body_read:
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_and_note, send_closing)


def surrogate_error(body: bytes) -> ConduitError | None:
    if not SURROGATE_ESCAPE.search(body):
        return None  # the common case: no parse here
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return invalid("The request body holds an unpaired UTF-16 surrogate escape (such as \\ud800), "
                       "which is not valid Unicode text")
    except (ValueError, RecursionError):
        pass  # not JSON: the route's own parser answers that
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return receive_again
