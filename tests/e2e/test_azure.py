"""Azure OpenAI's deployment routes through the official `openai.AzureOpenAI` client: the same
engine as the OpenAI routes, so greedy text must be identical."""

import httpx
import openai
import pytest

from tests.e2e.conftest import EMBEDDING_MODEL, MODEL

pytestmark = pytest.mark.e2e
API_VERSION = "2024-10-21"
MESSAGES = [{"role": "user", "content": "alpha beta gamma"}]
PROMPT = "alpha beta gamma delta"
GREEDY = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


@pytest.fixture
def azure(server):
    return openai.AzureOpenAI(azure_endpoint=server, api_key="k", api_version=API_VERSION, max_retries=0)


def test_chat_equals_openai_route(azure, client):
    got = azure.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    want = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.choices[0].finish_reason == "length"
    assert got.model == MODEL
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens, 12)


def test_completions_by_alias_with_stop(azure, client):
    """The deployment may be an alias; a stop string cut from the greedy text ends it there."""
    full = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).choices[0].text
    stop = full[len(full) // 2:][:3]
    got = azure.completions.create(model="demo", prompt=PROMPT, stop=[stop], **GREEDY)
    assert got.model == MODEL
    assert got.choices[0].text == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streaming_equals_whole(azure, kind):
    opts = {**GREEDY, "stream_options": {"include_usage": True}}
    if kind == "chat":
        whole = azure.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY).choices[0].message.content
        chunks = list(azure.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **opts))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        whole = azure.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).choices[0].text
        chunks = list(azure.completions.create(model=MODEL, prompt=PROMPT, stream=True, **opts))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_embeddings_equal_openai_route(azure, client):
    """The SDK asks for base64 and decodes it; the vectors must be the /v1/embeddings ones."""
    texts = ["a cat sat on the mat", "stock markets fell"]
    got = azure.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    want = client.embeddings.create(model=EMBEDDING_MODEL, input=texts, encoding_format="float")
    assert got.model == EMBEDDING_MODEL and got.usage.prompt_tokens == want.usage.prompt_tokens
    for g, w in zip(got.data, want.data):
        assert g.embedding == pytest.approx(w.embedding, abs=1e-6)
    with pytest.raises(openai.BadRequestError):  # a text-generation deployment cannot embed
        azure.embeddings.create(model=MODEL, input="x")


def test_unknown_deployment_is_not_found(azure):
    with pytest.raises(openai.NotFoundError) as err:
        azure.chat.completions.create(model="no-such-deployment", messages=MESSAGES)
    assert err.value.code == "DeploymentNotFound"
    assert "no-such-deployment" in err.value.message


def test_bad_parameter_names_it(azure):
    with pytest.raises(openai.BadRequestError) as err:
        azure.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=7)
    assert err.value.param == "temperature"


def test_api_version_is_required(server):
    url = f"{server}/openai/deployments/{MODEL}/chat/completions"
    response = httpx.post(url, json={"messages": MESSAGES}, headers={"api-key": "k"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "MissingApiVersionParameter"
    # a raw REST call needs no `model` in the body: the deployment names it
    response = httpx.post(url, params={"api-version": API_VERSION}, json={"messages": MESSAGES, "max_tokens": 2})
    assert response.status_code == 200 and response.json()["model"] == MODEL
