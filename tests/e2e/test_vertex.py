"""The Vertex AI custom-container contract: over HTTP with the documented shapes, and through the
official `google-cloud-aiplatform` prediction client (REST transport pointed at the local server).
Instances are bounded like choices (max_n) and fail together: one failure or a dropped client
aborts every instance's engine sequence. Their rate limits: tests/e2e/test_token_budget.py."""

import time

import httpx
import pytest
from google.api_core import exceptions as google_exceptions
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform_v1
from google.protobuf import json_format

from tests.e2e.conftest import MODEL, SECOND_MODEL, VERTEX_ENV
from tests.e2e.variants import call_deployment

pytestmark = pytest.mark.e2e
PREDICT = VERTEX_ENV["AIP_PREDICT_ROUTE"]
ENDPOINT = PREDICT.removeprefix("/v1/").removesuffix(":predict")  # projects/.../endpoints/e2e
PROMPT = "alpha beta gamma"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def predict(server, body: dict) -> httpx.Response:
    return httpx.post(server + PREDICT, json=body, timeout=60)


def greedy_completion(client, max_tokens: int) -> str:
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0).choices[0].text


def test_health_route(server):
    assert httpx.get(server + VERTEX_ENV["AIP_HEALTH_ROUTE"]).status_code == 200


def test_prompt_instances_with_parameters(server, client):
    """Integral floats for integer fields (as Vertex's client sends them); parameters are defaults."""
    res = predict(server, {
        "instances": [{"prompt": PROMPT, "raw_response": True}, {"prompt": PROMPT, "max_tokens": 4.0}],
        "parameters": {"max_tokens": 12.0, "temperature": 0.0, "top_k": -1.0},
    })
    assert res.status_code == 200, res.text
    raw, formatted = res.json()["predictions"]
    assert raw == greedy_completion(client, 12)
    assert formatted == f"Prompt:\n{PROMPT}\nOutput:\n{greedy_completion(client, 4)}"


def test_chat_instance(server, client):
    res = predict(server, {"instances": [{"@requestFormat": "chatCompletions", "messages": MESSAGES,
                                          "max_tokens": 10, "temperature": 0}]})
    assert res.status_code == 200, res.text
    (completion,) = res.json()["predictions"]
    expected = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": expected.choices[0].message.content,
                                                     "refusal": None}
    assert completion["choices"][0]["finish_reason"] == expected.choices[0].finish_reason
    assert completion["usage"] == expected.usage.model_dump(exclude_none=True)


def test_model_extension_picks_another_model(server, client):
    res = predict(server, {"instances": [{"prompt": PROMPT, "model": SECOND_MODEL, "raw_response": True}],
                           "parameters": {"max_tokens": 6, "temperature": 0}})
    assert res.status_code == 200, res.text
    assert res.json()["predictions"][0] == greedy_completion(client, 6)  # same weights


@pytest.mark.parametrize("body, status, rpc_status, names", [
    ({"instances": [{"prompt": PROMPT, "max_tokens": 16.5}]}, 400, "INVALID_ARGUMENT", "instances[0].max_tokens"),
    ({"instances": [{"prompt": PROMPT}], "parameters": {"temperature": 5}}, 400, "INVALID_ARGUMENT",
     "parameters.temperature"),
    ({"instances": [{"prompt": PROMPT, "messages": MESSAGES}]}, 400, "INVALID_ARGUMENT", "exactly one"),
    ({"instances": []}, 400, "INVALID_ARGUMENT", "instances"),
    ({"instances": [{"prompt": PROMPT, "model": "nope"}]}, 404, "NOT_FOUND", "nope"),
])
def test_errors_in_google_shape(server, body, status, rpc_status, names):
    res = predict(server, body)
    assert res.status_code == status
    error = res.json()["error"]
    assert (error["code"], error["status"]) == (status, rpc_status)
    assert names in error["message"]


@pytest.fixture
def prediction_client(server):
    return aiplatform_v1.PredictionServiceClient(
        transport="rest", credentials=AnonymousCredentials(), client_options=ClientOptions(api_endpoint=server))


def test_aiplatform_client_predict(prediction_client, client):
    res = prediction_client.predict(endpoint=ENDPOINT, instances=[{"prompt": PROMPT, "raw_response": True}],
                                    parameters={"max_tokens": 12, "temperature": 0})
    assert json_format.MessageToDict(res._pb)["predictions"] == [greedy_completion(client, 12)]


def test_aiplatform_client_error(prediction_client):
    with pytest.raises(google_exceptions.BadRequest, match="instances\\[0\\].max_tokens"):
        prediction_client.predict(endpoint=ENDPOINT, instances=[{"prompt": PROMPT, "max_tokens": 0}])


def test_instances_count_against_max_n(server):
    res = predict(server, {"instances": [{"prompt": PROMPT}] * 17, "parameters": {"max_tokens": 1}})
    assert res.status_code == 400, res.text
    assert "instances" in res.json()["error"]["message"] and "max_n" in res.json()["error"]["message"]


LONG_INSTANCE = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}  # seconds of work when left alone


def wait_engine_idle(within_s: float) -> dict:
    """The default model replica's engine stats once it runs no sequence; fails after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        stats = call_deployment("conduit", f"Model-{MODEL}", "stats")
        if stats["num_running"] == stats["num_waiting"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def test_a_failed_instance_cancels_its_siblings(server):
    too_long = {"prompt": "alpha " * 600}  # past the context window: a 400 from the tokenizer
    res = predict(server, {"instances": [LONG_INSTANCE] * 3 + [too_long]})
    assert res.status_code == 400 and "maximum context length" in res.json()["error"]["message"], res.text
    stats = wait_engine_idle(1.5)
    assert stats["num_running"] == stats["num_waiting"] == 0, stats


def test_a_dropped_client_cancels_every_instance(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + PREDICT, json={"instances": [LONG_INSTANCE] * 3}, timeout=1.0)
    stats = wait_engine_idle(2.0)
    assert stats["num_running"] == stats["num_waiting"] == 0, stats
