"""Many streams over the model replicas' stream channels (app/api/stream_mux.py): every stream gets
exactly its own tokens, in order, equal to transformers' greedy `generate`, while its deltas travel
with the other streams'; a stream dropped mid-way frees its batch slot; a killed replica ends its own
streams that had tokens from it with the error event, sends again the ones that had none (no client
sees the loss), and the other replica's streams finish whole."""

import asyncio
import os
import signal
import time

import httpx
import pytest
import ray
from ray import serve

from tests.e2e.tgi_stream import read_tgi_events
from tests.e2e.variants import call_deployment, deploy, model_args

pytestmark = pytest.mark.e2e
APP = "mux"
MODEL = "mux-demo"
DEPLOYMENT = f"Model-{MODEL}"
STREAMS = 64
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
OPTIONS = {DEPLOYMENT: {"num_replicas": 2, "max_ongoing_requests": 80, "health_check_period_s": 1,
                        "graceful_shutdown_wait_loop_s": 0.2}}


@pytest.fixture(scope="module")
def mux(server, model_path):
    engine = {"max_num_seqs": STREAMS, "max_model_len": 256, "stream_interval_s": 0.02, "max_waiting": 128}
    url = deploy(server, APP, {"models": [model_args(model_path, MODEL, **engine)]}, OPTIONS)
    yield url
    serve.delete(APP, _blocking=False)


def cases(count: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens): every stream a different prompt and length."""
    return [(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 17)), 6 + (7 * i) % 41)
            for i in range(count)]


def body(prompt: str, max_tokens: int) -> dict:
    """TGI's streaming body: its events carry each token's id, so a stream's tokens are compared exactly."""
    return {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens, "details": True}, "stream": True}


async def read_stream(http: httpx.AsyncClient, url: str, request: dict, drop_after: int | None = None,
                      result: dict | None = None) -> dict:
    """One streamed generation: its token ids in order, error events, finish_reason (into `result`
    as they arrive, when given); closes the connection after `drop_after` tokens when given."""
    result = {"ids": [], "errors": [], "finish": None} if result is None else result
    async with http.stream("POST", url, json=request) as r:
        assert r.status_code == 200, await r.aread()
        return await read_tgi_events(r, result, drop_after)


def expected_ids(hf_model, reference_greedy, prompt: str, max_tokens: int) -> list[int]:
    _, tokenizer = hf_model
    return reference_greedy(tokenizer.encode(prompt), max_tokens, ignore_eos=False)


def per_replica(method: str, calls: int = 24) -> list[dict]:
    """`method`'s answer from each model replica (the router spreads handle calls over both)."""
    seen = {}
    for _ in range(calls):
        answer = call_deployment(APP, DEPLOYMENT, method)
        seen[answer["replica"]] = answer
    return list(seen.values())


def engines_idle() -> bool:
    return all(s["num_running"] == s["num_waiting"] == s["kv_blocks_used"] == 0
               for s in (call_deployment(APP, DEPLOYMENT, "stats") for _ in range(12)))


def open_channels(url: str) -> None:
    """A few requests first: the replicas they reach ask for this ingress's channel (different prompts:
    the router sends a prompt prefix to the same replica each time)."""
    async def run():
        async with httpx.AsyncClient(timeout=60) as http:
            await asyncio.gather(*(read_stream(http, url, body(prompt, 4)) for prompt, _ in cases(16)))
    asyncio.run(run())
    time.sleep(0.5)


def test_64_streams_each_get_their_own_tokens_and_a_dropped_one_frees_its_slot(mux, hf_model, reference_greedy):
    url = f"{mux}/generate_stream"
    before = sum(s["carried"] for s in per_replica("stream_channels"))
    open_channels(url)  # right before the streams: a channel idle for CHANNEL_IDLE_S closes
    requests = cases(STREAMS)
    dropped = 0
    requests[dropped] = ("tell me a long story", 240)  # dropped after 3 chunks, long before its end

    async def run():
        limits = httpx.Limits(max_connections=STREAMS + 8)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.gather(*(read_stream(http, url, body(p, n), 3 if i == dropped else None)
                                          for i, (p, n) in enumerate(requests)))

    results = asyncio.run(run())
    for i, ((prompt, max_tokens), result) in enumerate(zip(requests, results)):
        if i == dropped:
            continue
        assert not result["errors"] and result["finish"] in ("length", "eos_token"), (i, result)
        assert result["ids"] == expected_ids(hf_model, reference_greedy, prompt, max_tokens), i
    # the dropped stream (240 tokens) left the engine: nothing runs once the others have finished
    deadline = time.monotonic() + 1.0
    while not engines_idle():
        assert time.monotonic() < deadline, per_replica("stream_channels")
        time.sleep(0.05)
    channels = per_replica("stream_channels")
    assert sum(s["carried"] for s in channels) - before >= STREAMS // 2, channels  # most took the channels


def test_killed_replica_ends_only_streams_it_had_started_and_the_rest_finish(mux, hf_model, reference_greedy):
    """Half the streams are generating when a replica is killed; the other half were sent just before
    the kill, so some are on their way to it or queued there without a token. No client gets a non-200:
    a stream ends with the error event only if it had tokens, and every other stream finishes whole."""
    url = f"{mux}/generate_stream"
    open_channels(url)
    requests = [(p, 60 + n) for p, n in cases(STREAMS)]  # long enough to be mid-stream at the kill
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#")]
    victim = ray.get_actor(names[0], namespace="serve")
    pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
    results = [{"ids": [], "errors": [], "finish": None} for _ in requests]
    generating = STREAMS // 2

    async def run():
        limits = httpx.Limits(max_connections=STREAMS + 8)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            streams = [asyncio.create_task(read_stream(http, url, body(p, n), result=r))
                       for (p, n), r in zip(requests[:generating], results)]
            async with asyncio.timeout(60):
                while not all(r["ids"] for r in results[:generating]):
                    await asyncio.sleep(0.02)
            streams += [asyncio.create_task(read_stream(http, url, body(p, n), result=r))
                        for (p, n), r in zip(requests[generating:], results[generating:])]
            await asyncio.sleep(0.05)  # sent, not yet answered
            os.kill(pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*streams), 90)

    asyncio.run(run())
    errored = [r for r in results if r["errors"]]
    finished = [(req, r) for req, r in zip(requests, results) if not r["errors"]]
    assert errored and finished, (len(errored), len(finished))
    assert all(r["ids"] and r["errors"] == [{"error": "The model replica serving this request failed; retry.",
                                             "error_type": "generation"}] for r in errored), errored
    for (prompt, max_tokens), result in finished:
        assert result["finish"] in ("length", "eos_token"), result
        assert result["ids"] == expected_ids(hf_model, reference_greedy, prompt, max_tokens)
