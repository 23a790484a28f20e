"""Clients that go away: every sequence they started must leave the engine (batch slot and KV blocks
freed) at the engine step after their close reaches it, however many drop at once, streamed or not,
n = 1 or more, round after round. Ray Serve's own child-request cancellation (`_on_request_cancelled`)
can raise mid-loop when many children end at once, so Conduit must not rely on it."""

import asyncio
import time

import httpx
import pytest
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.api.disconnects import cancel_call
from app.api.protocol import PreparedRequest
from app.engine.sampling_params import SamplingParams
from tests.e2e.variants import call_deployment, deploy, model_args, on_handle_loop

pytestmark = pytest.mark.e2e
APP = "drops"
MODEL = "drops-demo"
DEPLOYMENT = f"Model-{MODEL}"
SLOTS = 32  # serve_config.yaml's batch slots: every dropped stream runs at once
MAX_TOKENS = 900
# The client's close crossing the proxy and two Ray hops, then one engine step: 0.03-0.7 s measured
# on this 2-core machine shared with other test runs. The failure this guards against leaves
# sequences running to max_tokens (tens of seconds).
IDLE_WITHIN_S = 1.0
ROUNDS = 5


@pytest.fixture(scope="module")
def drops(server, model_path):
    # serve_config.yaml's engine: 32 slots, a 1024-token window, 20 ms coalescing
    engine = {"max_num_seqs": SLOTS, "max_model_len": 1024, "stream_interval_s": 0.02}
    url = deploy(server, APP, {"models": [model_args(model_path, MODEL, **engine)]}, {})
    _, stats = seconds_until_idle(limit_s=30)  # the handle is ready before any clock starts
    assert idle(stats), stats
    yield url
    serve.delete(APP, _blocking=False)


def chat(stream: bool, n: int = 1, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "tell me"}], "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, "stream": stream, "n": n}


def engine_stats() -> dict:
    return call_deployment(APP, DEPLOYMENT, "stats")


def idle(stats: dict) -> bool:
    return stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0


def seconds_until_idle(limit_s: float) -> tuple[float, dict]:
    """(seconds until the engine held no sequence and no KV block, the last stats read); gives up
    after `limit_s`, so a failure reports how many sequences were still running by then."""
    start = time.monotonic()
    while not idle(stats := engine_stats()) and time.monotonic() - start < limit_s:
        time.sleep(0.01)
    return time.monotonic() - start, stats


async def drop_after_first_chunk(http: httpx.AsyncClient, url: str, body: dict) -> None:
    async with http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        async for _ in r.aiter_bytes():
            break  # leaving the block closes the connection


async def drop_while_waiting(http: httpx.AsyncClient, url: str, body: dict) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await http.post(url, json=body, timeout=1.0)


async def drop_together(drop, url: str, body: dict, count: int) -> None:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        await asyncio.gather(*(drop(http, url, body) for _ in range(count)))


def assert_engine_freed(drop, url: str, body: dict, count: int) -> None:
    for round_ in range(ROUNDS):
        asyncio.run(drop_together(drop, url, body, count))
        took, stats = seconds_until_idle(limit_s=IDLE_WITHIN_S)
        print(f"{drop.__name__} x{count} n={body['n']} round {round_}: {took:.3f} s, {stats}")
        assert idle(stats), f"round {round_}: still in the engine {took:.2f} s after the drops: {stats}"


def short_call_seconds(url: str) -> float:
    start = time.monotonic()
    r = httpx.post(url, json=chat(stream=False, max_tokens=32), timeout=30)
    assert r.status_code == 200, r.text
    return time.monotonic() - start


def test_32_streams_dropped_after_their_first_chunk(drops):
    url = f"{drops}/v1/chat/completions"
    before = min(short_call_seconds(url) for _ in range(3))
    assert_engine_freed(drop_after_first_chunk, url, chat(stream=True), SLOTS)
    after = short_call_seconds(url)
    print(f"a 32-token call: {before:.3f} s before the drops, {after:.3f} s after")
    assert after < 2 * before + 0.2, (before, after)


def test_non_streamed_calls_dropped_while_waiting(drops):
    assert_engine_freed(drop_while_waiting, f"{drops}/v1/chat/completions", chat(stream=False), SLOTS)


def test_streams_of_several_choices_dropped_after_their_first_chunk(drops):
    assert_engine_freed(drop_after_first_chunk, f"{drops}/v1/chat/completions", chat(stream=True, n=4), SLOTS // 4)


def test_non_streamed_calls_of_several_choices_dropped_while_waiting(drops):
    assert_engine_freed(drop_while_waiting, f"{drops}/v1/chat/completions", chat(stream=False, n=4), SLOTS // 4)


def test_calls_cancelled_once_placed_but_not_yet_read_leave_the_engine(drops):
    """The moment Serve 2.60's own cancel() missed (app/api/disconnects.py, cancel_call): a call
    placed on its replica whose placement the caller had not read yet. Cancelled there, every one of
    them must still leave the engine. The calls are kept referenced until then, as a traceback's frames
    may keep them: a gRPC call that is collected is cancelled by gRPC itself, whatever Serve missed."""
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)

    async def place_then_cancel(round_: int) -> list:
        # routed on this loop, as in the ingress (this test process keeps Serve's defaults: conftest.py)
        handle = DeploymentHandle(DEPLOYMENT, APP)  # not Serve's cached one, already routed elsewhere
        handle._init(_run_router_in_separate_loop=False)
        calls = [handle.options(stream=True).generate.remote(
            PreparedRequest(f"placed-{round_}-{i}", MODEL, [1, 2, 3, 4], sampling)) for i in range(SLOTS)]
        for call in calls:  # placed: the router has handed each to the replica; nobody has read one
            while not call._replica_result_future.done():
                await asyncio.sleep(0.001)
        while (await handle.stats.remote())["num_running"] < SLOTS:  # all generating
            await asyncio.sleep(0.01)
        assert not any(call._replica_result for call in calls), "a call was read: not the case under test"
        for call in calls:
            cancel_call(call)
        return calls

    for round_ in range(ROUNDS):
        calls = on_handle_loop(place_then_cancel(round_))
        took, stats = seconds_until_idle(limit_s=IDLE_WITHIN_S)
        del calls
        assert idle(stats), f"round {round_}: still in the engine {took:.2f} s after the cancels: {stats}"
