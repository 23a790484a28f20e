"""`conduit bench` loads: prompts of their own per request, and a stream that carries tokens but no text."""

import asyncio
import json

from aiohttp import web

from app.bench import RequestResult, _one_request, session, summarize, synthetic_prompt


def test_every_index_has_a_prompt_of_its_own_and_always_the_same():
    prompts = [synthetic_prompt(64, i) for i in range(2000)]
    assert len(set(prompts)) == 2000
    # differing from the first words on: a prefix cache's first block is never shared
    assert len({tuple(p.split()[:8]) for p in prompts}) == 2000
    assert synthetic_prompt(64, 7) == prompts[7]
    assert all(len(p.split()) == 64 for p in prompts)


def test_a_request_with_tokens_but_no_text_counts_without_a_ttft():
    texted = RequestResult(ok=True, ttft=0.1, e2e=1.1, output_tokens=11, chunk_times=[0.1, 1.1])
    textless = RequestResult(ok=True, e2e=2.0, output_tokens=64)
    summary = summarize([texted, textless, RequestResult(error="HTTP 500: x")], duration=1.0, config={})
    assert (summary["completed"], summary["without_text"], summary["failed"]) == (2, 1, 1)
    assert summary["total_output_tokens"] == 75
    assert summary["ttft_ms"]["p50"] == summary["ttft_ms"]["p99"] == 100.0
    assert [r["ttft_ms"] for r in summary["requests"]] == [100.0, None]
    assert textless.tpot is None
    assert summary["tokens_per_chunk"] == 5.5  # of the requests that had text


def stream_server(events: list[dict]) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


async def one_request_to(events: list[dict]) -> RequestResult:
    runner = web.AppRunner(stream_server(events))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with session() as client:
            return await _one_request(client, f"http://127.0.0.1:{port}/v1/completions", {"prompt": "x"}, chat=False)
    finally:
        await runner.cleanup()


def test_a_served_stream_of_tokens_without_text_is_completed():
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 64}}
    result = asyncio.run(one_request_to([{"choices": [{"text": ""}]}, usage]))
    assert result.ok and result.ttft is None and result.output_tokens == 64


def test_a_stream_with_neither_text_nor_usage_fails():
    result = asyncio.run(one_request_to([{"choices": [{"text": ""}]}]))
    assert not result.ok and result.error == "no text and no usage in the stream"
