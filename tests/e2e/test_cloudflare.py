"""Cloudflare Workers AI's run route through the official `cloudflare` SDK: greedy text must equal
the OpenAI routes' (a plain prompt is chat-templated as Workers AI does; `raw` skips the template)."""

import json

import cloudflare
import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e
ACCOUNT = "acct"
CF_MODEL = f"@cf/{MODEL}"  # the SDK sends it %2F-encoded
PROMPT = "alpha beta gamma delta"
GREEDY = {"max_tokens": 12, "temperature": 0}


@pytest.fixture
def cf(server):
    return cloudflare.Cloudflare(api_token="t", base_url=f"{server}/client/v4", max_retries=0)


def text_and_usage(result: dict) -> tuple[str, dict]:  # the SDK hands text generation back as a dict
    return result["response"], result["usage"]


def openai_usage(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def test_raw_prompt_equals_openai_completions(cf, client):
    got = cf.ai.run(CF_MODEL, account_id=ACCOUNT, prompt=PROMPT, raw=True, **GREEDY)
    want = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    assert text_and_usage(got) == (want.choices[0].text, openai_usage(want.usage))


@pytest.mark.parametrize("model", [CF_MODEL, "demo"])  # catalog form or a plain id / alias
def test_prompt_and_messages_equal_openai_chat(cf, client, model):
    messages = [{"role": "system", "content": "beta"}, {"role": "user", "content": PROMPT}]
    got = cf.ai.run(model, account_id=ACCOUNT, messages=messages, **GREEDY)
    want = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert text_and_usage(got) == (want.choices[0].message.content, openai_usage(want.usage))
    templated = cf.ai.run(model, account_id=ACCOUNT, prompt=PROMPT, **GREEDY)
    want = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], **GREEDY)
    assert templated["response"] == want.choices[0].message.content


def test_streaming(cf):
    whole = cf.ai.run(CF_MODEL, account_id=ACCOUNT, prompt=PROMPT, **GREEDY)
    with cf.ai.with_streaming_response.run(CF_MODEL, account_id=ACCOUNT, prompt=PROMPT, stream=True, **GREEDY) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert "".join(e["response"] for e in events) == whole["response"]
    assert events[-1]["usage"] == whole["usage"]


def test_unknown_model_raises_sdk_error(cf):
    with pytest.raises(cloudflare.BadRequestError) as err:
        cf.ai.run("@cf/no-such-model", account_id=ACCOUNT, prompt=PROMPT)
    body = err.value.body
    assert body["success"] is False and body["result"] is None
    assert body["errors"][0]["code"] == 5007 and "no-such-model" in body["errors"][0]["message"]


def test_bad_parameter_names_it(cf):
    with pytest.raises(cloudflare.BadRequestError) as err:
        cf.ai.run(CF_MODEL, account_id=ACCOUNT, prompt=PROMPT, temperature=9)
    [error] = err.value.body["errors"]
    assert error["code"] == 5006 and "temperature" in error["message"]
