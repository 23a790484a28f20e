"""Tokens per minute are reserved before generating (prompt + n × max_tokens) and settled after, on a
keyed app ("budget") with small limits. Each test has a key of its own, so their budgets do not mix."""

import hashlib
import secrets
import time

import pytest
from openai import OpenAI, RateLimitError
from ray import serve

from tests.e2e.variants import call_deployment, deploy, model_args

pytestmark = pytest.mark.e2e
APP = "budget"
MODEL = "budget-demo"
RPM, TPM = 8, 300
KEYS = {name: f"sk-conduit-test-{secrets.token_hex(12)}" for name in ("tokens",)}
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
