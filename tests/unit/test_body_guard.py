"""BodyGuard's deadline and CloseUnread, as ASGI apps called directly: a body that does not arrive
in time gets 408 and the connection is told to close; a body read whole keeps it open."""

import asyncio
import json

from starlette.responses import JSONResponse

from app.api.input_limits import BodyGuard, CloseUnread


async def echo(scope, receive, send):
    message = await receive()
    await JSONResponse({"got": message["body"].decode()})(scope, receive, send)


def reject(request, err):
    return JSONResponse({"error": {"code": err.code}}, status_code=err.status)


def call(app, chunks: list[bytes], stall: bool, path: str = "/v1/completions") -> tuple[dict, dict, float]:
    """POST `chunks` (then nothing more, forever, when `stall`): (response start, body, seconds)."""

    async def run():
        pending = [{"type": "http.request", "body": c, "more_body": stall or i < len(chunks) - 1}
                   for i, c in enumerate(chunks)]
        sent = []

        async def receive():
            if pending:
                return pending.pop(0)
            await asyncio.Event().wait()  # a client that never sends the rest

        async def send(message):
            sent.append(message)

        headers = [(b"content-length", b"100000" if stall else str(sum(map(len, chunks))).encode())]
        scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b""}
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(app(scope, receive, send), 5)
        return sent[0], json.loads(sent[1]["body"]), asyncio.get_running_loop().time() - started

    return asyncio.run(run())


def guarded(timeout_s: float):
    return CloseUnread(BodyGuard(echo, max_bytes=1000, timeout_s=timeout_s, reject=reject))


def test_a_body_that_does_not_arrive_in_time_gets_408_and_closes():
    start, body, seconds = call(guarded(0.3), [b'{"model": '], stall=True)
    assert start["status"] == 408 and body["error"]["code"] == "request_timeout"
    assert 0.3 <= seconds < 2
    assert (b"connection", b"close") in start["headers"]


def test_a_body_read_whole_keeps_the_connection():
    start, body, _ = call(guarded(5), [b'{"model": ', b'"m"}'], stall=False)
    assert start["status"] == 200 and body == {"got": '{"model": "m"}'}
    assert (b"connection", b"close") not in start["headers"]


def test_a_body_past_the_size_limit_closes_too():
    start, body, _ = call(guarded(5), [b"x" * 600, b"x" * 600], stall=True)
    assert start["status"] == 413 and body["error"]["code"] == "request_too_large"
    assert (b"connection", b"close") in start["headers"]


def test_a_path_limit_lets_uploads_past_the_body_limit_and_only_them():
    app = BodyGuard(echo, max_bytes=1000, timeout_s=5, reject=reject, path_limits={"/v1/files": 5000})
    start, body, _ = call(app, [b"x" * 3000], stall=False, path="/v1/files")
    assert start["status"] == 200 and len(body["got"]) == 3000
    start, body, _ = call(app, [b"x" * 3000], stall=False)
    assert start["status"] == 413 and body["error"]["code"] == "request_too_large"
    start, body, _ = call(app, [b"x" * 6000], stall=False, path="/v1/files")
    assert start["status"] == 413
