"""A full ingress answers for itself: past its capacity (the Ingress deployment's max_ongoing_requests
less an eighth) a call gets 503 with Retry-After in its route's API shape, at once, instead of Ray's
proxy queueing it and then answering a plain-text 503 of its own. Run on a second app ("narrow")
whose Ingress takes 8 requests at once, so 7 calls fill it."""

import asyncio
import json

import httpx
import pytest
from openai import AsyncOpenAI, InternalServerError
from ray import serve

from tests.e2e.variants import deploy, model_args

pytestmark = pytest.mark.e2e
APP = "narrow"
MODEL = "narrow-demo"
CAPACITY = 7  # 8 - 8 // 8
MAX_TOKENS = 900  # long enough to outlast the crowd on a busy machine


@pytest.fixture(scope="module")
def narrow(server, model_path):
    args = {"models": [model_args(model_path, MODEL, max_num_seqs=CAPACITY, max_model_len=1024)]}
    # Ray's proxy counts a request as queued until it is assigned a replica, so its queue must hold a
    # burst (here 20 at once) even when the replica has room: smaller, Ray answers the burst itself
    yield deploy(server, APP, args, {"Ingress": {"max_ongoing_requests": 8, "max_queued_requests": 32}})
    serve.delete(APP, _blocking=False)


def chat(stream: bool, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "tell me"}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}


async def hold_a_slot(http: httpx.AsyncClient, url: str, streaming: asyncio.Event) -> int:
    """A long stream; `streaming` is set at its first chunk (or its failure). The completion tokens it got."""
    tokens = 0
    try:
        async with http.stream("POST", url, json={**chat(True), "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                streaming.set()
                if line.startswith("data: {"):
                    tokens = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", tokens)
    finally:
        streaming.set()
    return tokens


def assert_overloaded(r: httpx.Response) -> None:
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, (r.status_code, r.text)
    assert r.elapsed.total_seconds() < 10, "refused, not left to wait out a deadline"


def test_full_ingress_answers_503_in_the_api_shape(narrow):
    url = f"{narrow}/v1/chat/completions"

    async def run():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
            streaming = [asyncio.Event() for _ in range(CAPACITY)]
            holders = [asyncio.create_task(hold_a_slot(http, url, event)) for event in streaming]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in streaming)), 60)
            crowd = await asyncio.gather(*(http.post(url, json=chat(False, 4)) for _ in range(20)))
            # refused while every slot was still held: none of them waited for a slot to free
            assert not any(holder.done() for holder in holders), "the crowd outlasted a long stream"
            anthropic = await http.post(f"{narrow}/v1/messages", json={
                "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
            models = await http.get(f"{narrow}/v1/models")  # reads are not capped
            sdk = AsyncOpenAI(base_url=f"{narrow}/v1", api_key="unused", max_retries=0)
            with pytest.raises(InternalServerError) as sdk_refused:
                await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            return await asyncio.gather(*holders), crowd, anthropic, models, sdk_refused.value

    held, crowd, anthropic, models, sdk_error = asyncio.run(run())
    assert held == [MAX_TOKENS] * CAPACITY, "the calls inside capacity ran to their end"
    for r in crowd:
        assert_overloaded(r)
        assert r.json()["error"]["code"] == "server_overloaded" and r.json()["error"]["type"] == "server_error"
    assert_overloaded(anthropic)
    assert anthropic.json()["type"] == "error" and anthropic.json()["error"]["type"] == "overloaded_error"
    assert models.status_code == 200
    assert sdk_error.status_code == 503 and sdk_error.code == "server_overloaded"
    after = httpx.post(url, json=chat(False, 4), timeout=30)  # the slots are free again
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4
