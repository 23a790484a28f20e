"""Hugging Face TGI's routes through the official `huggingface_hub.InferenceClient`: greedy text
must equal the OpenAI completions route's (one engine), and details/stream events must agree."""

import json

import httpx
import jsonschema
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e
PROMPT = "alpha beta gamma delta"
MAX_NEW = 12
TGI_FINISH = {"length": "length", "stop": "eos_token"}  # OpenAI's finish reason -> TGI's, no stop strings


@pytest.fixture
def hf(server):
    return InferenceClient(base_url=server)


@pytest.fixture
def openai_greedy(client):
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0)


def test_greedy_equals_openai_route(hf, openai_greedy):
    assert hf.text_generation(PROMPT, max_new_tokens=MAX_NEW) == openai_greedy.choices[0].text


def test_details(hf, server, openai_greedy):
    out = hf.text_generation(PROMPT, max_new_tokens=MAX_NEW, details=True)
    want = openai_greedy.choices[0]
    assert out.generated_text == want.text
    details = out.details
    assert details.finish_reason == TGI_FINISH[want.finish_reason]
    assert details.generated_tokens == len(details.tokens) == openai_greedy.usage.completion_tokens
    assert details.seed is None  # greedy: TGI reports no seed
    assert "".join(t.text for t in details.tokens) == out.generated_text
    assert sum(bool(t.text) for t in details.tokens) > len(details.tokens) // 2  # per-token texts, mostly
    assert all(isinstance(t.logprob, float) and t.logprob <= 0 for t in details.tokens)
    ids = [t.id for t in details.tokens if not t.special]
    decoded = httpx.post(f"{server}/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"]
    assert decoded == out.generated_text


def test_stream_plain_and_with_details(hf, openai_greedy):
    want = openai_greedy.choices[0].text
    assert "".join(hf.text_generation(PROMPT, max_new_tokens=MAX_NEW, stream=True)) == want
    events = list(hf.text_generation(PROMPT, max_new_tokens=MAX_NEW, stream=True, details=True))
    assert len(events) == openai_greedy.usage.completion_tokens
    assert [e.index for e in events] == list(range(1, len(events) + 1))
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == want == "".join(e.token.text for e in events)
    assert last.details.finish_reason == TGI_FINISH[openai_greedy.choices[0].finish_reason]
    assert last.details.generated_tokens == len(events)
    assert last.details.input_length == openai_greedy.usage.prompt_tokens


def test_stop_sequence_is_kept_like_tgi(hf, openai_greedy):
    full = openai_greedy.choices[0].text
    stop = full[len(full) // 2:][:3]
    out = hf.text_generation(PROMPT, max_new_tokens=MAX_NEW, stop=[stop], details=True)
    assert out.generated_text == full[: full.index(stop)] + stop
    assert out.details.finish_reason == "stop_sequence"


def test_return_full_text_and_generate_route(hf, server, openai_greedy):
    assert hf.text_generation(PROMPT, max_new_tokens=MAX_NEW, return_full_text=True) == PROMPT + openai_greedy.choices[0].text
    response = httpx.post(f"{server}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_NEW}})
    assert response.json() == {"generated_text": openai_greedy.choices[0].text}
    assert response.headers["x-generated-tokens"] == str(openai_greedy.usage.completion_tokens)


def test_seeded_sampling_is_reproducible(hf):
    runs = [hf.text_generation(PROMPT, max_new_tokens=MAX_NEW, do_sample=True, seed=7, details=True) for _ in range(2)]
    assert runs[0].generated_text == runs[1].generated_text and runs[0].details.seed == 7
    unseeded = hf.text_generation(PROMPT, max_new_tokens=4, temperature=0.8, details=True)
    assert isinstance(unseeded.details.seed, int)  # a warper means sampling: a seed is drawn and reported


def test_prefill_and_top_tokens(hf, server):
    out = hf.text_generation(PROMPT, max_new_tokens=6, details=True, decoder_input_details=True, top_n_tokens=3)
    prompt_ids = httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    prefill = out.details.prefill
    assert [t.id for t in prefill] == prompt_ids
    assert prefill[0].logprob is None and all(t.logprob <= 0 for t in prefill[1:])
    assert len(out.details.top_tokens) == len(out.details.tokens)
    for token, top in zip(out.details.tokens, out.details.top_tokens):  # the client leaves these as dicts
        assert len(top) == 3 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
        assert (top[0]["id"], top[0]["logprob"]) == (token.id, token.logprob)  # greedy picks the best


def test_json_grammar(hf):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    text = hf.text_generation(PROMPT, max_new_tokens=60, grammar={"type": "json", "value": schema})
    jsonschema.validate(json.loads(text), schema)


def test_chat_completion_reaches_openai_route(hf, client):
    messages = [{"role": "user", "content": "alpha beta"}]
    got = hf.chat_completion(messages, model=MODEL, max_tokens=8, temperature=0)
    want = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage.completion_tokens == want.usage.completion_tokens


@pytest.mark.parametrize("params, field", [
    ({"temperature": 0.0}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"top_n_tokens": 9}, "top_n_tokens"),
    ({"grammar": {"type": "regex", "value": "[a-z]+"}}, "regex"),
    ({"typical_p": 0.5}, "typical_p"),
])
def test_validation_errors(hf, params, field):
    with pytest.raises(ValidationError, match=field):
        hf.text_generation(PROMPT, max_new_tokens=4, **params)


def test_stream_error_and_info(hf, server):
    with pytest.raises(ValidationError, match="context"):
        next(iter(hf.text_generation(PROMPT * 200, max_new_tokens=4, stream=True)))
    info = httpx.get(f"{server}/info").json()  # InferenceClient.get_endpoint_info needs the HF provider
    assert info["model_id"] == MODEL and info["max_total_tokens"] == 512
    assert httpx.post(f"{server}/generate", json={"parameters": {}}).json()["error_type"] == "validation"
