"""A client that goes away frees its engine sequences: the ingress cancels the model calls of its
HTTP request itself, the moment the app reads `http.disconnect` (Starlette's streaming responses
listen for it) and again when the request ends, however it ends. Nothing here waits for a generator
to be closed or collected, nor for Ray Serve to cancel the request's child calls:

- Starlette leaves a streaming response's body iterator unclosed when the task is cancelled while it
  awaits `send`, so the Pipeline's `finally` (which cancels the model call) runs only when the
  iterator is collected;
- Ray Serve 2.60's `_on_request_cancelled` cancels a cancelled request's child calls in a loop that
  raises "dictionary changed size during iteration" when one of them finishes meanwhile (their
  done-callbacks remove them from that dict on Ray's own thread), leaving the rest running;
- Ray Serve 2.60's own `cancel()` can miss a call (see `cancel_call`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def cancel_call(call) -> None:
    """Cancel a Serve call, on its replica too. With the router on the caller's event loop
    (RAY_SERVE_THROUGHPUT_OPTIMIZED), Serve 2.60's `cancel()` cancels the replica's call only if the
    caller has already read which replica took it; one placed but not yet read (the reading task not
    yet resumed, or never started) was left to run to its end (tests/e2e/test_cancellation.py: 32 of
    32 such calls kept generating; CI saw a Vertex instance outlive its failed sibling). Here the
    replica's call is then cancelled too."""
    call.cancel()
    placed = getattr(call, "_replica_result_future", None)  # Serve's private state: absent, nothing more to do
    if (placed is None or getattr(call, "_replica_result", True) is not None or not placed.done()
            or placed.cancelled() or placed.exception() is not None):
        return
    placed.result().cancel()


class OpenCalls:
    """The model calls (anything with `cancel()`) one HTTP request has open."""

    def __init__(self):
        self._calls: set = set()
        self.client_gone = False

    def add(self, call) -> None:
        if self.client_gone:  # nobody will read it
            cancel_call(call)
        self._calls.add(call)

    def discard(self, call) -> None:
        self._calls.discard(call)

    def cancel_all(self) -> None:
        self.client_gone = True
        calls, self._calls = self._calls, set()
        for call in calls:
            cancel_call(call)  # a no-op for a call that has finished


# The request's OpenCalls; the tasks a request starts (Starlette's, the Pipeline's) inherit it.
open_calls: ContextVar[OpenCalls | None] = ContextVar("open_calls", default=None)


@contextmanager
def cancelled_unless_finished(call) -> Iterator[None]:
    """Runs the block with `call` cancelled if the block does not finish (an error, a cancellation,
    its generator closed early) or, in an HTTP request, as soon as the request's client goes away."""
    calls = open_calls.get() or OpenCalls()
    calls.add(call)
    try:
        yield
    except BaseException:
        cancel_call(call)
        raise
    finally:
        calls.discard(call)


class CancelOnDisconnect:
    """ASGI middleware, the ingress's outermost: each HTTP request gets its own `OpenCalls`, cancelled
    when the app reads `http.disconnect` or `receive` fails (Serve raises there once the proxy has
    dropped the request), and when the app returns or raises (a cancellation included)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        calls = OpenCalls()
        token = open_calls.set(calls)

        async def receive_watching() -> Message:
            try:
                message = await receive()
            except Exception:
                calls.cancel_all()
                raise
            if message["type"] == "http.disconnect":
                calls.cancel_all()
            return message

        try:
            await self.app(scope, receive_watching, send)
        finally:
            calls.cancel_all()
            open_calls.reset(token)
