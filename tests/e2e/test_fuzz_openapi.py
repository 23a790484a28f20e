"""Schemathesis against the server's own /openapi.json: every documented route and method, a bounded,
derandomized number of generated requests each (valid ones and ones that break the schema). No answer
may be a server error, and every error answer must be a JSON body in its API's error shape (the
document declares only 200 and FastAPI's 422, while the adapters answer 400/404/413/... in their own
shapes, so the status itself is not checked against it).

Valid cases get the served models (path parameters and the body's `model`), so they reach the engine
instead of stopping at "model not found"; the small-window model keeps every generation short.

Hypothesis drives schemathesis's strategies directly: schemathesis's lazy pytest loader (the one that
could read the schema from a fixture's server) does not run under pytest 9.2."""

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.e2e.conftest import EMBEDDING_MODEL, SECOND_MODEL

pytestmark = pytest.mark.e2e
MODEL_PARAMETERS = ("model", "model_id", "deployment")
AZURE_QUERY = {"api-version": "2024-10-21"}
FUZZ_SETTINGS = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
REQUEST_TIMEOUT_S = 30  # a hang is a failure, not a stuck CI job


def model_for(path: str) -> str:
    return EMBEDDING_MODEL if "embed" in path else SECOND_MODEL


def with_served_model(case):
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model_for(case.path)
    return case


def cases(operation):
    """Valid requests naming a served model, and requests that break the schema somewhere."""
    served = {p.name: model_for(operation.path) for p in operation.path_parameters if p.name in MODEL_PARAMETERS}
    # Azure's routes read their required ?api-version= outside the schema
    query = AZURE_QUERY if operation.path.startswith("/openai/deployments/") else None
    valid = operation.as_strategy(GenerationMode.POSITIVE, path_parameters=served, query=query).map(with_served_model)
    return st.one_of(valid, operation.as_strategy(GenerationMode.NEGATIVE))


def error_message(body) -> str | None:
    """The message of an error body in any of the served APIs' shapes (OpenAI, Anthropic and Vertex:
    error.message; Bedrock: message; TGI: error; Cloudflare: errors[0].message)."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        return error.get("message")
    if isinstance(error, str):
        return error
    if isinstance(body.get("errors"), list) and body["errors"]:
        return body["errors"][0].get("message")
    return body.get("message")


def error_in_api_shape(ctx, response, case) -> bool | None:
    """An error answer is a client error (TGI's 424 is its failed generation: a server error in
    disguise) with a JSON body that carries a message."""
    if response.status_code < 400:
        return None
    assert response.status_code < 500 and response.status_code != 424, f"server error {response.status_code}: {response.text[:500]}"
    try:
        body = response.json()
    except ValueError:
        body = None
    message = error_message(body)
    assert isinstance(message, str) and message, f"{response.status_code} without an error message: {response.text[:500]}"
    return True


def fuzz(operation) -> None:
    @FUZZ_SETTINGS
    @given(case=cases(operation))
    def check(case):
        case.call_and_validate(checks=[not_a_server_error, response_schema_conformance, error_in_api_shape],
                               timeout=REQUEST_TIMEOUT_S)

    check()


def test_every_route_survives_fuzzing(server, subtests):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    responses_api = {op.label for op in operations if op.path.startswith("/v1/responses")}
    assert len(responses_api) == 5, responses_api  # create, retrieve, delete, cancel, input items
    files_and_batches = {op.label for op in operations if op.path.startswith(("/v1/files", "/v1/batches"))}
    assert len(files_and_batches) == 9, files_and_batches  # files: 5 routes, batches: create, list, retrieve, cancel
    lora = {op.label for op in operations if op.path.endswith("_lora_adapter")}
    assert len(lora) == 2, lora  # vLLM's load and unload
    for operation in operations:
        with subtests.test(msg=operation.label):
            fuzz(operation)
