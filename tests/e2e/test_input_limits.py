"""The caps of `ingress.input_limits` (defaults here), checked once in the Pipeline for every wire
format, and the body guard in front of every route: each violation is a 4xx naming the field."""

import httpx
import openai
import pytest

from tests.e2e.conftest import EMBEDDING_MODEL, MODEL

pytestmark = pytest.mark.e2e
HI = [{"role": "user", "content": "hi"}]


def tool(i: int) -> dict:
    return {"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"n": 17}, "n"),
        ({"n": 2**70}, "n"),
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"stop": ["x" * 257]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"messages": HI * 2049}, "messages"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tools": [tool(i) for i in range(129)]}, "tools"),
    ],
)
def test_chat_caps_name_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": MODEL, "messages": HI, "max_tokens": 2, **kwargs})
    assert e.value.body["param"] == param and "at most" in e.value.body["message"], e.value.body


@pytest.mark.parametrize("max_tokens", [32_769, 2**70])
def test_max_tokens_past_the_window_and_the_cap(client, max_tokens):
    """The test model's window (512) is below the cap, so its error comes first; the cap alone is
    unit-tested (tests/unit/test_input_limit_checks.py)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=max_tokens)
    assert e.value.body["param"] == "max_tokens"


def test_completions_caps(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, stop=[f"s{i}" for i in range(17)])
    assert e.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, logprobs=21)
    assert e.value.body["param"] == "logprobs" and "at most 20" in e.value.body["message"]


def test_embedding_inputs_cap(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBEDDING_MODEL, input=["hi"] * 2049)
    assert e.value.body["param"] == "input"


@pytest.mark.parametrize(
    "fields,named", [({"messages": HI * 2049}, "messages"), ({"stop_sequences": [f"s{i}" for i in range(17)]}, "stop")]
)
def test_caps_apply_to_every_wire_format(server, fields, named):
    """The same caps, checked in the Pipeline, answered in Anthropic's error shape on its route."""
    body = {"model": MODEL, "max_tokens": 2, "messages": HI, **fields}
    response = httpx.post(f"{server}/v1/messages", json=body)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["message"].startswith(f"{named}: at most"), error


def test_within_the_caps_is_served(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=HI * 4, max_tokens=2, n=2, stop=[f"s{i}" for i in range(16)]
    )
    assert len(reply.choices) == 2


def test_chunked_body_past_the_size_limit_gets_413(server):
    """No content-length to check up front: the guard counts the bytes as they arrive."""

    def chunks():
        yield b'{"model": "conduit-demo", "prompt": "'
        for _ in range(2_000):
            yield b"x" * 1_000
        yield b'"}'

    response = httpx.post(f"{server}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_unpaired_surrogate_gets_400_but_a_pair_is_text(server):
    lone = b'{"model": "conduit-demo", "prompt": "a\\ud800b", "max_tokens": 2}'
    response = httpx.post(f"{server}/v1/completions", content=lone, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "surrogate" in response.json()["error"]["message"]
    pair = b'{"model": "conduit-demo", "prompt": "a\\ud83d\\ude00b", "max_tokens": 2}'  # an emoji
    response = httpx.post(f"{server}/v1/completions", content=pair, headers={"content-type": "application/json"})
    assert response.status_code == 200
