"""CancelOnDisconnect around a real Starlette app, called directly as ASGI: the model calls a request
opened are cancelled when its client goes away, even where the code that opened them never gets to
run its own cleanup (Starlette leaves a streaming body suspended when the disconnect cancels it in
`send`), and when the request ends or is cancelled."""

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from app.api.disconnects import CancelOnDisconnect, OpenCalls, cancelled_unless_finished


class Call:
    """Stands for a Serve streaming call: all the middleware uses is `cancel()`."""

    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


def app_opening(calls: list[Call], streaming: bool, forever: asyncio.Event | None = None):
    bodies = []  # kept alive, as a reference cycle would keep them: nothing closes them

    async def body():
        with cancelled_unless_finished(calls[-1]):
            while True:
                yield b"data: x\n\n"

    async def route(request):
        calls.append(Call())
        if streaming:
            bodies.append(body())
            return StreamingResponse(bodies[-1], media_type="text/event-stream")
        with cancelled_unless_finished(calls[-1]):
            await forever.wait()  # a long generation, never finished here
        return JSONResponse({})

    return CancelOnDisconnect(Starlette(routes=[Route("/", route, methods=["POST"])]))


SCOPE = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}


def test_a_stream_whose_client_goes_away_mid_send_has_its_call_cancelled():
    calls: list[Call] = []

    async def run():
        body_sent, stuck = asyncio.Event(), asyncio.Event()
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await body_sent.wait()  # the client leaves while a chunk is being sent
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body":
                body_sent.set()
                await stuck.wait()  # this send is cancelled, leaving the body generator suspended

        await asyncio.wait_for(app_opening(calls, streaming=True)(SCOPE, receive, send), 5)
        assert len(calls) == 1 and calls[0].cancelled  # before asyncio.run closes leftover generators

    asyncio.run(run())


def test_a_cancelled_request_has_its_call_cancelled():
    calls: list[Call] = []

    async def run():
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else await asyncio.Event().wait()

        async def send(message):
            pass

        task = asyncio.create_task(app_opening(calls, streaming=False, forever=asyncio.Event())(SCOPE, receive, send))
        while not calls:
            await asyncio.sleep(0.01)
        task.cancel()  # what Serve does when the proxy sees the client leave
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert len(calls) == 1 and calls[0].cancelled


def test_a_call_opened_after_the_client_left_is_cancelled_at_once():
    calls = OpenCalls()
    calls.cancel_all()
    late = Call()
    calls.add(late)
    assert late.cancelled


def test_a_block_that_finishes_leaves_its_call_and_one_that_fails_cancels_it():
    finished, failed = Call(), Call()
    with cancelled_unless_finished(finished):
        pass
    with pytest.raises(ValueError), cancelled_unless_finished(failed):
        raise ValueError
    assert not finished.cancelled and failed.cancelled
