"""An engine failure after the Anthropic stream began reaches the `anthropic` SDK as an `error`
event, not a silent cut. The pipeline here fails on purpose; HTTP (uvicorn) and the SDK are real."""

import socket
import threading
import time

import anthropic
import pytest
import uvicorn
from fastapi import FastAPI, Request

from app.api import anthropic as adapter
from app.api.errors import ConduitError
from app.engine.engine import RequestOutput


class FailingPipeline:
    """Streams one delta, then fails as an overloaded replica would."""

    async def stream(self, req):
        async def deltas():
            yield 0, RequestOutput(req.request_id, [5], "Hi", num_prompt_tokens=3, num_output_tokens=1)
            raise ConduitError("the model replica is overloaded", 503)

        return deltas()


@pytest.fixture(scope="module")
def base_url():
    app = FastAPI()

    @app.middleware("http")
    async def set_request_id(request: Request, call_next):
        request.state.request_id = "r1"
        return await call_next(request)

    app.include_router(adapter.routes(FailingPipeline()).router)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


def test_error_after_first_token_is_an_error_event(base_url):
    client = anthropic.Anthropic(base_url=base_url, api_key="x", max_retries=0)
    seen = []
    with pytest.raises(anthropic.APIStatusError) as e:
        for ev in client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}], stream=True):
            seen.append(ev.type)
    assert seen == ["message_start", "content_block_start", "content_block_delta"]
    assert e.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "the model replica is overloaded"}}
