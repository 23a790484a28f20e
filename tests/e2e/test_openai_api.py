"""The served endpoint through the official `openai` SDK, against transformers' `generate`."""

import asyncio
import json
import time

import httpx
import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def prompt_of(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


def test_models_and_health(client, server):
    ids = [m.id for m in client.models.list().data]
    assert MODEL in ids and "demo" in ids
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_concurrent_greedy_equals_generate(async_client, hf_model, reference_greedy):
    """16 concurrent requests of different prompt lengths and max_tokens, token for token."""
    _, tokenizer = hf_model
    cases = [(prompt_of(3 + 5 * i), 8 + 3 * i) for i in range(16)]

    async def one(prompt: str, max_tokens: int):
        return await async_client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
            extra_body={"min_tokens": max_tokens},
        )

    async def all_of_them():
        return await asyncio.gather(*(one(p, n) for p, n in cases))

    results = asyncio.run(all_of_them())
    for (prompt, n), res in zip(cases, results):
        expected = reference_greedy(tokenizer.encode(prompt), n)
        assert res.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        assert res.usage.completion_tokens == n
        assert res.usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert res.choices[0].finish_reason == "length"


def test_chat_non_streaming_matches_generate(client, hf_model, reference_greedy):
    _, tokenizer = hf_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                         extra_body={"min_tokens": 12})
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)
    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-")
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == tokenizer.decode(reference_greedy(ids, 12), skip_special_tokens=True)
    assert res.choices[0].finish_reason == "length"
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_chat_streaming(client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=20, temperature=0, extra_body={"min_tokens": 20})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completion_streaming_ends_with_done(server):
    body = {"model": MODEL, "prompt": "gamma delta", "max_tokens": 10, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(p["object"] == "text_completion" for p in payloads)


def test_stop_string_is_not_emitted(client):
    base = client.completions.create(model=MODEL, prompt="alpha beta", max_tokens=30, temperature=0,
                                     extra_body={"min_tokens": 30}).choices[0].text
    stop = base[10:14]
    res = client.completions.create(model=MODEL, prompt="alpha beta", max_tokens=30, temperature=0, stop=[stop])
    assert stop not in res.choices[0].text
    assert base.startswith(res.choices[0].text)
    assert res.choices[0].finish_reason == "stop"


def test_seed_gives_same_sample(client):
    kwargs = dict(model=MODEL, prompt="theta iota", max_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/chat/completions", '{"model": ', 400, None),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": "alpha " * 600}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "alpha", "max_tokens": 100000}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "alpha", "bogus_field": 1}, 400, "bogus_field"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ],
)
def test_bad_input_gets_openai_error(server, path, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server}{path}", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    # and the server keeps serving
    ok = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "alpha", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_sdk_raises_its_own_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="alpha " * 600)


def test_disconnected_stream_frees_engine(server):
    from ray import serve

    handle = serve.get_deployment_handle("Model-conduit-demo", app_name="conduit")
    # left alone, these 8 x 490 tokens would keep the engine busy for several seconds
    body = {"model": MODEL, "prompt": "alpha beta", "max_tokens": 490, "stream": True, "ignore_eos": True}
    for _ in range(8):
        with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as r:
            next(r.iter_lines())  # first chunk, then hang up
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        stats = handle.stats.remote().result()
        if stats["num_running"] == 0 and stats["kv_blocks_used"] == 0:
            break
        time.sleep(0.2)
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0, stats


def test_n_choices(client):
    res = client.completions.create(model=MODEL, prompt="alpha beta", max_tokens=8, n=3, temperature=1.0, seed=5,
                                    extra_body={"min_tokens": 8})
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert len({c.text for c in res.choices}) > 1  # different seeds per choice
    assert res.usage.completion_tokens == 24
    again = client.completions.create(model=MODEL, prompt="alpha beta", max_tokens=8, n=3, temperature=1.0, seed=5,
                                      extra_body={"min_tokens": 8})
    assert [c.text for c in again.choices] == [c.text for c in res.choices]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, n=2, stream=True,
        stream_options={"include_usage": True}, extra_body={"min_tokens": 6}))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
    assert chunks[-1].usage.completion_tokens == 12


def test_each_model_id_reaches_its_own_deployment(client):
    from tests.e2e.conftest import SECOND_MODEL

    assert SECOND_MODEL in [m.id for m in client.models.list().data]
    prompt = "alpha " * 40  # fits conduit-demo's 512-token window, not conduit-small's 64
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=30).usage.completion_tokens > 0
    import openai

    with pytest.raises(openai.BadRequestError, match="maximum context length is 64"):
        client.completions.create(model=SECOND_MODEL, prompt=prompt, max_tokens=30)
    small = client.completions.create(model=SECOND_MODEL, prompt="alpha", max_tokens=4, temperature=0,
                                      extra_body={"min_tokens": 4})
    big = client.completions.create(model=MODEL, prompt="alpha", max_tokens=4, temperature=0,
                                    extra_body={"min_tokens": 4})
    assert small.model == SECOND_MODEL and small.choices[0].text == big.choices[0].text  # same weights


def test_tokenize_detokenize_and_model_lookup(server, hf_model):
    _, tokenizer = hf_model
    r = httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": "alpha beta"}).json()
    assert r["tokens"] == tokenizer.encode("alpha beta") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 512
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(f"{server}/tokenize", json={"model": MODEL, "messages": messages}).json()
    expected = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)
    assert chat["tokens"] == expected
    back = httpx.post(f"{server}/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert back["prompt"] == "alpha beta"
    bad = httpx.post(f"{server}/detokenize", json={"model": MODEL, "tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    found = httpx.get(f"{server}/v1/models/demo")
    assert found.status_code == 200 and found.json()["root"] == MODEL, found.text
    assert httpx.get(f"{server}/v1/models/nope").status_code == 404


def test_oversized_body_gets_413(server):
    r = httpx.post(f"{server}/v1/completions", content=b"x" * 1_100_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
