"""Fair to every tenant, through the HTTP ingress with real API keys (app "fair", 4 batch slots, a queue
of 8): a key that floods does not hold another key's request behind its own, a key's queue share is
its own, and a key asking for a better class than its policy allows is capped, with the header saying
which class ran. Greedy outputs stay those of transformers' `generate` through the preemptions."""

import asyncio
import hashlib
import json
import secrets

import httpx
import pytest
from ray import serve

from deployments.model import key_bracket_size
from tests.e2e.variants import call_deployment, deploy, model_args

pytestmark = pytest.mark.e2e
APP = "fair"
MODEL = "fair-demo"
SLOTS, MAX_WAITING = 4, 8
KEYS = {name: f"sk-conduit-test-{secrets.token_hex(12)}" for name in ("flood", "steady", "batch")}
PROMPT = "alpha beta gamma delta epsilon"


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def fair(server, model_path, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("fair") / "api_keys.sha256"
    keys_file.write_text("".join(hashlib.sha256(k.encode()).hexdigest() + "\n" for k in KEYS.values()))
    policies = [{"key_id": key_id(KEYS["steady"]), "max_class": "interactive"},
                {"key_id": key_id(KEYS["batch"]), "max_class": "batch"}]
    engine = {"max_num_seqs": SLOTS, "max_model_len": 512, "max_waiting": MAX_WAITING, "preempt_after_s": 0.05}
    args = {"models": [model_args(model_path, MODEL, **engine)],
            "auth": {"api_keys_file": str(keys_file), "keys": policies}}
    yield deploy(server, APP, args, {})
    serve.delete(APP, _blocking=False)


def engine_stats() -> dict:
    return call_deployment(APP, f"Model-{MODEL}", "stats")


def body(max_tokens: int, **extra) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}


def auth(name: str) -> dict:
    return {"authorization": f"Bearer {KEYS[name]}"}


async def wait_for_engine(running: int, waiting: int) -> None:
    for _ in range(600):
        stats = await asyncio.to_thread(engine_stats)
        if stats["num_running"] >= running and stats["num_waiting"] >= waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the flood never reached the engine: {stats}")


class Flood:
    """`count` streams of one key, each recording its text and whether `event` was set when it finished."""

    def __init__(self, client: httpx.AsyncClient, url: str, count: int, max_tokens: int, event: asyncio.Event):
        self.texts, self.finished_after_event, self.statuses = [""] * count, [None] * count, [None] * count
        self.tasks = [asyncio.create_task(self._one(client, url, i, max_tokens, event)) for i in range(count)]

    async def _one(self, client, url, i, max_tokens, event):
        async with client.stream("POST", f"{url}/v1/completions", headers=auth("flood"),
                                 json=body(max_tokens, stream=True)) as response:
            self.statuses[i] = response.status_code
            if response.status_code != 200:
                await response.aread()
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                self.texts[i] += choice["text"]
                if choice["finish_reason"] is not None:
                    self.finished_after_event[i] = event.is_set()

    async def done(self):
        await asyncio.gather(*self.tasks)


def test_another_key_is_served_while_the_flood_still_runs(fair, hf_model, reference_greedy):
    """Causally: every one of the flood's streams ends after the other key's request completed. First
    come, first served would have run (and finished) the flood's queued requests first."""
    tokenizer = hf_model[1]

    async def scenario():
        served = asyncio.Event()
        async with httpx.AsyncClient(timeout=120) as client:
            flood = Flood(client, fair, SLOTS + MAX_WAITING - 2, 300, served)
            await wait_for_engine(SLOTS, MAX_WAITING - 2)
            # two at once: the first borrows the one spare slot, the second preempts one of the flood's
            steady = await asyncio.gather(*(client.post(f"{fair}/v1/completions", headers=auth("steady"),
                                                        json=body(32)) for _ in range(2)))
            served.set()
            await flood.done()
        return flood, steady

    flood, steady = asyncio.run(scenario())
    assert [r.status_code for r in steady] == [200, 200], [r.text for r in steady]
    assert flood.statuses == [200] * len(flood.statuses)
    assert flood.finished_after_event == [True] * len(flood.statuses), "a flood stream finished before the other key"
    prompt_ids = tokenizer.encode(PROMPT)
    assert all(r.json()["choices"][0]["text"] == tokenizer.decode(reference_greedy(prompt_ids, 32),
                                                                  skip_special_tokens=True) for r in steady)
    # one of the flood's streams was preempted for the other key's second request and recomputed: same text
    assert all(text == tokenizer.decode(reference_greedy(prompt_ids, 300), skip_special_tokens=True)
               for text in flood.texts)
    assert engine_stats()["preemptions_by_cause"]["fair_share"] >= 1


def test_a_flooding_key_fills_its_own_share_of_the_queue(fair):
    """Alone, the flood may hold the whole queue, and one more of its requests is refused; another key
    still gets in (its share: half the queue), although the queue is full."""

    async def scenario():
        never = asyncio.Event()
        async with httpx.AsyncClient(timeout=120) as client:
            flood = Flood(client, fair, SLOTS + MAX_WAITING, 60, never)
            await wait_for_engine(SLOTS, MAX_WAITING)
            # what the replica tells the router (its load per key, in brackets)
            routing = await asyncio.to_thread(call_deployment, APP, f"Model-{MODEL}", "record_routing_stats")
            refused = await client.post(f"{fair}/v1/completions", headers=auth("flood"), json=body(4))
            other = await client.post(f"{fair}/v1/completions", headers=auth("steady"), json=body(4))
            await flood.done()
        return refused, other, routing

    refused, other, routing = asyncio.run(scenario())
    bracket = key_bracket_size(SLOTS)
    assert routing == {"key_brackets": {key_id(KEYS["flood"]): (SLOTS + MAX_WAITING) // bracket}}, routing
    assert refused.status_code == 503 and "queue is full" in refused.json()["error"]["message"], refused.text
    assert other.status_code == 200, other.text


@pytest.mark.parametrize(("key", "asked", "ran"), [
    ("batch", -1, "batch"), ("batch", None, "batch"), ("flood", -1, "standard"), ("flood", None, "standard"),
    ("flood", 3, "batch"), ("steady", -1, "interactive"),
])
def test_a_class_above_the_keys_cap_is_capped_and_the_header_says_which_ran(fair, key, asked, ran):
    extra = {} if asked is None else {"priority": asked}
    whole = httpx.post(f"{fair}/v1/completions", headers=auth(key), json=body(2, **extra), timeout=60)
    assert whole.status_code == 200, whole.text
    assert whole.headers["x-conduit-priority"] == ran
    with httpx.stream("POST", f"{fair}/v1/chat/completions", headers=auth(key), timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                            "stream": True, **extra}) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["x-conduit-priority"] == ran
        streamed.read()
