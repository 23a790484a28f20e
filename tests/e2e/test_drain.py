"""Graceful drain beyond a redeploy (tests/e2e/test_robustness.py has that one): SIGTERM to `conduit
run`, and a model deployment scaled from 2 replicas to 1, each while streams run. Every stream that
was accepted must finish whole: its finish_reason and every token it asked for."""

import asyncio
import os
import signal
import subprocess
import time

import httpx
import pytest
import ray
from openai import AsyncOpenAI
from ray import serve

from app.config import PROJECT_ROOT
from tests.e2e.test_auth import session_logs
from tests.e2e.test_serve_config import BIN, ENV, config_on_port, free_port, wait_and_ask
from tests.e2e.variants import LIGHT, deploy, model_args

pytestmark = pytest.mark.e2e
STREAMS = 6
MAX_TOKENS = 300  # a few seconds per stream on a 2-core machine
APP = "scaledown"
MODEL = "scaledown-demo"
MODEL_DEPLOYMENT = f"Model-{MODEL}"


async def stream_to_end(client: AsyncOpenAI, model: str, first_chunk: asyncio.Event) -> dict:
    """One streamed chat read to its end: finish_reason, tokens reported, when it ended. `first_chunk`
    is set once it streams (or fails)."""
    finish, tokens = None, None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "tell me"}], max_tokens=MAX_TOKENS,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            first_chunk.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    finally:
        first_chunk.set()
    return {"finish": finish, "tokens": tokens, "ended": time.monotonic()}


async def streams_around(action, base_url: str, model: str):
    """STREAMS streams; once each has its first chunk, `await action()`.
    (the streams' results, when the action began, what it returned)."""
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    started = [asyncio.Event() for _ in range(STREAMS)]
    streams = [asyncio.create_task(stream_to_end(client, model, event)) for event in started]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 60)
    acted_at = time.monotonic()
    outcome = await action()
    return await asyncio.wait_for(asyncio.gather(*streams), 120), acted_at, outcome


def assert_all_whole(results: list[dict], acted_at: float) -> None:
    assert [(r["finish"], r["tokens"]) for r in results] == [("length", MAX_TOKENS)] * STREAMS
    assert all(r["ended"] > acted_at for r in results), "every stream was still running when it began"


def test_sigterm_drains_conduit_run(tmp_path):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(BIN / "conduit"), "run", str(config_on_port(tmp_path, port))], env=ENV,
                            cwd=PROJECT_ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_and_ask(port, proc)

        async def sigterm_then_knock() -> httpx.Response | httpx.HTTPError:
            os.kill(proc.pid, signal.SIGTERM)  # the process only, as docker stop and Kubernetes send it
            await asyncio.sleep(1)
            try:  # new work during the drain: refused at once, not held
                async with httpx.AsyncClient(timeout=10) as http:
                    return await http.post(f"{base_url}/v1/completions",
                                           json={"model": "conduit-demo", "prompt": "hi", "max_tokens": 2})
            except httpx.HTTPError as e:
                return e

        results, signalled_at, knock = asyncio.run(streams_around(sigterm_then_knock, base_url, "conduit-demo"))
        drained_s = max(r["ended"] for r in results) - signalled_at
        exit_code = proc.wait(60)
        stopped_s = time.monotonic() - signalled_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"SIGTERM: streams done {drained_s:.1f} s after it, process exited {stopped_s:.1f} s after it; "
          f"a call during the drain got {getattr(knock, 'status_code', knock)!r}")
    assert_all_whole(results, signalled_at)
    assert exit_code == 0
    assert isinstance(knock, httpx.HTTPError) or knock.status_code in (404, 503), knock
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base_url}/v1/models", timeout=2)


@pytest.fixture(scope="module")
def two_replicas(server, model_path):
    args = {"models": [model_args(model_path, MODEL, max_num_seqs=STREAMS, max_model_len=512)]}
    # serve.run gives every deployment a new random version, so a second run would replace every
    # replica (a redeploy); a fixed version makes it what `serve deploy` of a new num_replicas is: a
    # scale-down. Serve only lets its own code set a version, hence _internal.
    options = {"*": {**LIGHT, "version": "1", "_internal": True},
               # half the streams each: Serve sends a replica no more than its max_ongoing_requests, of
               # which the Ingress's stream channel to it holds one (app/api/stream_mux.py)
               MODEL_DEPLOYMENT: {"num_replicas": 2, "max_ongoing_requests": STREAMS // 2 + 1,
                                  "graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": 60}}
    yield deploy(server, APP, args, options), args, options
    serve.delete(APP, _blocking=False)


def replica_actor_names(deployment: str) -> set[str]:
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def model_replica_ids() -> set[str]:
    return {name.rsplit("#", 1)[1] for name in replica_actor_names(MODEL_DEPLOYMENT)}


def deployment_pids(deployment: str) -> set[int]:
    actors = [ray.get_actor(name, namespace="serve") for name in replica_actor_names(deployment)]
    return set(ray.get([actor.__ray_call__.remote(lambda self: os.getpid()) for actor in actors], timeout=10))


def replica_log(replica_id: str) -> str:
    return (session_logs() / "serve" / f"replica_{APP}_{MODEL_DEPLOYMENT}_{replica_id}.log").read_text()


def started_requests(replica_id: str) -> int:
    return replica_log(replica_id).count(": started,")


def channel_open(replica_id: str) -> bool:
    return "stream channel from ingress" in replica_log(replica_id)


def until_both_replicas_stream(url: str, replicas: set[str]) -> None:
    """Concurrent short requests until each replica has served one and the Ingress has opened its
    stream channel to it. The channel, opened after a replica's first call, holds one of its
    max_ongoing_requests: before it is open a replica could take one stream more than half, after it
    the sixth stream waited for a slot and began after others had ended (found by CI)."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            await asyncio.gather(*(http.post("/v1/chat/completions", json=chat) for _ in range(STREAMS)))

    deadline = time.monotonic() + 60
    while not all(started_requests(r) and channel_open(r) for r in replicas):
        assert time.monotonic() < deadline, {r: (started_requests(r), channel_open(r)) for r in replicas}
        asyncio.run(burst())
        time.sleep(0.5)  # the channel opens after the call that asked for it


def test_scale_down_drops_no_stream(two_replicas, server):
    url, args, options = two_replicas
    before = model_replica_ids()
    assert len(before) == 2
    other_pids = deployment_pids("Ingress") | deployment_pids("Tokenizer")
    until_both_replicas_stream(url, before)
    started_before = {replica: started_requests(replica) for replica in before}

    async def scale_to_one():
        one = {**options, MODEL_DEPLOYMENT: {**options[MODEL_DEPLOYMENT], "num_replicas": 1}}
        await asyncio.to_thread(deploy, server, APP, args, one)
        return {replica: started_requests(replica) - started_before[replica] for replica in before}

    results, scaled_at, started_per_replica = asyncio.run(streams_around(scale_to_one, url, MODEL))
    assert_all_whole(results, scaled_at)
    assert list(started_per_replica.values()) == [STREAMS // 2] * 2, started_per_replica
    deadline = time.monotonic() + 60
    while len(model_replica_ids()) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert model_replica_ids() < before, "one of the two replicas went, none was replaced"
    (removed,) = before - model_replica_ids()
    assert deployment_pids("Ingress") | deployment_pids("Tokenizer") == other_pids, "a scale-down, not a redeploy"
    # the removed replica was stopping while its streams ran (Serve's own log line), and finished every one
    log = replica_log(removed)
    assert "to shut down:" in log
    assert log.count(f"finished (length), {MAX_TOKENS} tokens") == started_per_replica[removed]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30).status_code == 200
