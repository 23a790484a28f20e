"""Admission of one HTTP call, before any route runs, in this order: its Host (421 unless loopback,
when no keys are configured), its API key (401; probe paths take GET/HEAD only, 405), the ingress
replica's capacity (503), its key's rate limits (429) and its deadline. The result travels to the Pipeline in `app.limits.current_call`,
with the key's scheduling policy (auth.keys: its tenant id and best priority class); the response
says which class its generation ran at (`x-conduit-priority`)."""

from __future__ import annotations

import asyncio
import logging
import math
from functools import partial

from fastapi import Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import ConduitError, invalid, unavailable
from app.auth import (
    KeyStore,
    check_exposure,
    describe,
    loopback_host,
    missing_or_wrong,
    open_paths,
    presented_key,
    probe_paths,
    unmatched_policies,
)
from app.config import AppConfig
from app.limits import Budget, Call, RateLimiter, counter_actor, current_call
from app.qos import PRIORITY_HEADER

log = logging.getLogger("ray.serve")
TIMEOUT_HEADER = "x-request-timeout"  # seconds; a client may shorten ingress.request_timeout_s
ANONYMOUS = "anonymous"  # the one rate-limit bucket when no keys are configured


def route_path(request: Request) -> str:
    """The path as the app's routes see it: without the application's route prefix."""
    return request.scope["path"].removeprefix(request.scope.get("root_path", ""))


class Gate:
    def __init__(self, config: AppConfig, keys: KeyStore | None, limiter: RateLimiter | None):
        self.config, self.keys, self.limiter = config, keys, limiter
        self.probe_paths, self.open_paths = probe_paths(), open_paths(config.auth)
        # keyless and not behind an authenticating gateway: served on loopback only (check_exposure)
        self.loopback_only = not (config.auth.enabled or config.auth.allow_unauthenticated)

    @classmethod
    def from_config(cls, config: AppConfig, host: str) -> Gate:
        """`host`: the address the front binds (`http_options.host`)."""
        check_exposure(config.auth, host)  # refuses to start: no keys on a public host
        keys = KeyStore.from_config(config.auth) if config.auth.enabled else None
        log.info(describe(config.auth, keys or KeyStore([])))
        for unmatched in unmatched_policies(config.auth, keys or KeyStore([])):
            log.warning("auth.keys: no configured API key has the id %s; its policy applies to nobody", unmatched)
        limits = config.rate_limits
        limiter = None
        if limits.requests_per_minute or limits.tokens_per_minute:
            counter = counter_actor()
            limiter = RateLimiter(limits, lambda *args: counter.take.remote(*args))
        return cls(config, keys, limiter)

    def authenticate(self, request: Request) -> str | None:
        """The caller's key id (ANONYMOUS when no keys are configured), or None on an open path;
        raises 421 (a keyless server called by another name than loopback's), 405 (a probe path called
        with a method that sends a body) or 401."""
        if self.loopback_only and not loopback_host(request.headers.get("host")):
            raise ConduitError("This server has no API keys and answers only to a loopback Host "
                               "(localhost, 127.0.0.1, [::1]); configure auth for other names", 421,
                               code="misdirected_request")
        path = route_path(request)
        if path in self.probe_paths:
            if request.method not in ("GET", "HEAD"):
                raise ConduitError(f"{path} answers GET and HEAD only, not {request.method}", 405,
                                   code="method_not_allowed", headers={"allow": "GET, HEAD"})
            if path in self.open_paths:
                return None
        if self.keys is None:
            return ANONYMOUS
        presented = presented_key(request.headers)
        key = self.keys.identify(presented)
        if key is None:
            raise missing_or_wrong(presented)
        return key

    async def admit(self, request: Request, key: str, now: float) -> tuple[Call, dict[str, str]]:
        """(the call's context, headers for its response); raises 429 / 400."""
        deadline = now + self.timeout(request.headers.get(TIMEOUT_HEADER))
        scheduling = {"tenant": key, "max_class": self.config.auth.policy(key).max_class}
        if self.limiter is None or request.method != "POST":  # only work is rate-limited, not reads
            return Call(deadline, **scheduling), {}
        headers = await self.limiter.admit(key)
        return Call(deadline, partial(self.limiter.charge, key), Budget(self.limiter, key), **scheduling), headers

    def timeout(self, asked: str | None) -> float:
        limit = self.config.ingress.request_timeout_s
        if asked is None:
            return limit
        try:
            seconds = float(asked)
        except ValueError:
            seconds = math.nan
        if not seconds > 0 or math.isinf(seconds):
            raise invalid(f"Invalid value for '{TIMEOUT_HEADER}': a number of seconds > 0 is required", TIMEOUT_HEADER)
        return min(seconds, limit)


class _Step:
    """An ASGI middleware step of the gate: `check` lets a call through (returns the app to run it
    with) or refuses it (raises), and a refused call gets `reject`'s answer at once."""

    def __init__(self, app: ASGIApp, gate: Gate, reject):
        self.app, self.gate, self.reject = app, gate, reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        try:
            app = await self.check(request)
        except ConduitError as err:
            app = self.reject(request, err)
        await app(scope, receive, send)

    async def check(self, request: Request) -> ASGIApp:
        raise NotImplementedError


class Authenticate(_Step):
    """Outside the capacity check: a call refused here (wrong key, wrong method on a probe path) is
    answered at once, before anything counts it or reads its body. The key id is left in
    `request.state.key_id` for `Admit`."""

    async def check(self, request: Request) -> ASGIApp:
        request.state.key_id = self.gate.authenticate(request)
        return self.app


class Admit(_Step):
    """After `Authenticate` and the capacity check: admitted calls run with their `Call` in
    `current_call` and their rate-limit headers (and the class their generation ran at) added to
    the response's start; refused ones (429, 400) get `reject`'s answer. Open paths pass as they are.
    Plain ASGI, not Starlette's `BaseHTTPMiddleware`: that one carries every chunk of a streamed
    body through a memory stream and a task of its own."""

    async def check(self, request: Request) -> ASGIApp:
        key = request.state.key_id
        if key is None:
            return self.app
        call, headers = await self.gate.admit(request, key, asyncio.get_running_loop().time())
        return partial(self._run, call, headers)

    async def _run(self, call: Call, headers: dict[str, str], scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                response_headers.update(headers)
                if call.ran_class is not None:  # it generated: the class it ran at, after the key's cap
                    response_headers[PRIORITY_HEADER] = call.ran_class
            await send(message)

        token = current_call.set(call)
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            current_call.reset(token)


class InFlightCap:
    """ASGI middleware: at most `limit` POST calls (the ones that do work) that passed `Authenticate`
    in flight in this replica, streamed bodies included; one more gets a 503 with Retry-After in its route's API shape at once.
    Ray Serve bounds the replica too (max_ongoing_requests, then max_queued_requests in the proxy's
    queue), but past that bound the proxy answers a plain-text 503 of its own, in no API's shape.
    `limit` sits below Ray's bound, so clients get this answer instead and Ray's queue stays empty."""

    def __init__(self, app: ASGIApp, limit: int, reject):
        self.app, self.limit, self.reject, self.in_flight = app, limit, reject, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":  # reads (models, health) are cheap
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            err = unavailable(f"The server is at capacity ({self.limit} requests in flight); retry shortly.",
                              "server_overloaded")
            return await self.reject(Request(scope), err)(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def ingress_capacity(max_ongoing: int) -> int:
    """POST calls this ingress replica takes at once: its deployment's max_ongoing_requests less an
    eighth, the headroom for reads and for refusals, which Ray counts as ongoing too."""
    return max(1, max_ongoing - max(1, max_ongoing // 8))
