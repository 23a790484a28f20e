"""Tokens per minute are reserved before generating (prompt + n × max_tokens) and settled after, and a
Vertex predict call's instances count one request each, on a keyed app ("budget") with small limits.
Each test has a key of its own, so their budgets do not mix."""

import hashlib
import secrets
import time

import httpx
import pytest
from openai import OpenAI, RateLimitError
from ray import serve

from tests.e2e.conftest import VERTEX_ENV
from tests.e2e.variants import call_deployment, deploy, model_args

pytestmark = pytest.mark.e2e
APP = "budget"
MODEL = "budget-demo"
RPM, TPM = 8, 300
KEYS = {name: f"sk-conduit-test-{secrets.token_hex(12)}" for name in ("tokens", "requests", "vertex_tokens")}
PROMPT = "alpha beta gamma delta " * 5  # over one KV block: the engine's prefix lookups count each admission


@pytest.fixture(scope="module")
def budget(server, model_path, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("budget") / "api_keys.sha256"
    keys_file.write_text("".join(hashlib.sha256(k.encode()).hexdigest() + "\n" for k in KEYS.values()))
    args = {"models": [model_args(model_path, MODEL)], "auth": {"api_keys_file": str(keys_file)},
            "rate_limits": {"requests_per_minute": RPM, "tokens_per_minute": TPM}}
    yield deploy(server, APP, args, {})
    serve.delete(APP, _blocking=False)


@pytest.fixture(autouse=True)
def one_window():
    """Limits are per wall-clock minute: start each test early in one."""
    if time.time() % 60 > 40:
        time.sleep(61 - time.time() % 60)


def engine_stats() -> dict:
    return call_deployment(APP, f"Model-{MODEL}", "stats")


def engine_idle_soon() -> bool:
    """Whether the model replica runs no sequence within a second (an abort takes a step to land)."""
    deadline = time.monotonic() + 1
    while (stats := engine_stats())["num_running"] + stats["num_waiting"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return stats["num_running"] + stats["num_waiting"] == 0


def test_a_reservation_past_the_budget_is_refused_before_generating(budget):
    client = OpenAI(base_url=f"{budget}/v1", api_key=KEYS["tokens"], max_retries=0)
    first = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, extra_body={"ignore_eos": True})
    prompt_tokens = first.usage.prompt_tokens
    left = TPM - first.usage.total_tokens  # settled: what it used, not the 60 it reserved
    admitted_before = engine_stats()["prefix_queries"]
    with pytest.raises(RateLimitError) as refused:  # max_tokens alone is past what is left
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=left + 1)
    error = refused.value
    assert error.code == "rate_limit_exceeded" and "tokens per minute" in error.message
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.headers["x-ratelimit-remaining-tokens"] == str(left)
    assert engine_stats()["prefix_queries"] == admitted_before, "the engine never saw the refused request"
    fits = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=left - prompt_tokens)
    assert fits.headers["x-ratelimit-remaining-tokens"] == str(left), "the refusal cost the key nothing"
    assert fits.parse().usage.total_tokens <= left


def predict(budget: str, key: str, instances: list[dict]) -> httpx.Response:
    return httpx.post(budget + VERTEX_ENV["AIP_PREDICT_ROUTE"], headers={"x-api-key": key},
                      json={"instances": instances, "parameters": {"max_tokens": 2}}, timeout=60)


def test_each_vertex_instance_counts_as_a_request(budget):
    key, one = KEYS["requests"], {"prompt": "alpha"}
    refused = predict(budget, key, [one] * (RPM + 1))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["status"] == "RESOURCE_EXHAUSTED" and int(refused.headers["retry-after"]) >= 1
    # a refused call still counts as the one request its admission took: used 1
    assert predict(budget, key, [one] * 3).status_code == 200  # used 4
    assert predict(budget, key, [one] * 5).status_code == 429  # used 5: needs 4 more, 3 are left
    assert len(predict(budget, key, [one] * 3).json()["predictions"]) == 3  # used 8
    assert predict(budget, key, [one]).status_code == 429


def test_vertex_instances_reserve_tokens_together(budget):
    key, long = KEYS["vertex_tokens"], {"prompt": "alpha", "max_tokens": 2 * TPM // 3}
    refused = predict(budget, key, [long, long])  # each fits alone, not both
    assert refused.status_code == 429, refused.text
    assert "tokens per minute" in refused.json()["error"]["message"]
    assert engine_idle_soon(), "the instance that fitted was cancelled with the call"
    assert predict(budget, key, [long]).status_code == 200
