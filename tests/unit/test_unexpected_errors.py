"""A failure no layer maps to an API error (a bug, an unmapped Ray exception) still answers in the
called API's own error shape, naming the exception, and the server keeps serving. The whole ingress
app (build_api: middlewares, adapters, handlers, the real Pipeline) runs in-process; only the
Tokenizer deployment's handle is a stand-in, failing on purpose."""

import anthropic
import openai
import pytest
from fastapi.testclient import TestClient

from app.api.model_table import ModelTable
from app.api.pipeline import Pipeline
from app.api.server import build_api
from app.config import parse_app_config


class BrokenHandle:
    """A deployment handle whose every call fails with an exception nothing maps."""

    def __getattr__(self, method: str):
        raise RuntimeError("wheel fell off")


@pytest.fixture(scope="module")
def http():
    config = parse_app_config({"models": [{"name": "m", "source": "x"}]})
    pipeline = Pipeline(BrokenHandle(), ModelTable({"m": []}, {"m": BrokenHandle()}))
    api = build_api(pipeline, config, host="127.0.0.1", max_ongoing_requests=64)
    # a loopback Host: a keyless server answers no other (app/auth.py)
    with TestClient(api, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client


def test_openai_client_reads_a_500_that_names_the_failure(http):
    client = openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="x", http_client=http, max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="m", prompt="hi", max_tokens=2)
    assert e.value.body["type"] == "server_error" and e.value.body["code"] == "internal_error"
    assert e.value.body["message"] == "internal error: RuntimeError: wheel fell off"
    assert client.models.list().data[0].id == "m"  # still serving


def test_anthropic_client_gets_its_own_shape(http):
    client = anthropic.Anthropic(base_url="http://127.0.0.1", api_key="x", http_client=http, max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as e:
        client.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "api_error"
    assert "RuntimeError: wheel fell off" in e.value.body["error"]["message"]
