"""Conduit's errors on Bedrock paths, parsed by botocore as boto3 does: each status becomes the
exception class boto3 raises."""

import asyncio
from types import SimpleNamespace

import botocore.session
import pytest
from botocore.parsers import RestJSONParser

from app.api.errors import ConduitError
from app.api.wire import bedrock
from app.api.wire.bedrock import error_response


@pytest.fixture(scope="module")
def client():
    return botocore.session.get_session().create_client(
        "bedrock-runtime", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")


@pytest.mark.parametrize("status, conduit_code, code", [
    (400, None, "ValidationException"),
    (401, "invalid_api_key", "AccessDeniedException"),
    (404, None, "ResourceNotFoundException"),
    (413, None, "ValidationException"),
    (429, None, "ThrottlingException"),
    (429, "model_not_ready", "ModelNotReadyException"),
    (500, None, "InternalServerException"),
    (503, "server_overloaded", "ServiceUnavailableException"),
    (503, "replica_unavailable", "ModelNotReadyException"),
    (504, "deadline_exceeded", "ModelTimeoutException"),
])
def test_error_maps_to_boto3_exception(client, status, conduit_code, code):
    shape = client.meta.service_model.operation_model("Converse").output_shape
    response = error_response(ConduitError("the reason", status, code=conduit_code))
    parsed = RestJSONParser().parse(
        {"status_code": response.status_code, "headers": dict(response.headers), "body": response.body}, shape)
    assert parsed["Error"] == {"Code": code, "Message": "the reason"}
    assert client.exceptions.from_code(code).__name__ == code


@pytest.mark.parametrize("running, code, expected", [
    (False, "deadline_exceeded", "model_not_ready"),  # the deadline passed during a cold start
    (True, "deadline_exceeded", "deadline_exceeded"),  # ... or while a running model generated
    (False, "model_not_found", "model_not_found"),  # other errors pass through
])
def test_deadline_while_cold_is_model_not_ready(monkeypatch, running, code, expected):
    async def without_running_replica(model):
        assert model == "m"
        return not running

    monkeypatch.setattr(bedrock, "without_running_replica", without_running_replica)
    pipeline = SimpleNamespace(models=SimpleNamespace(resolve=lambda model_id: "m"))

    async def call():
        async with bedrock.not_ready_while_cold(pipeline, "alias-of-m"):
            raise ConduitError("the reason", 504, code=code)

    with pytest.raises(ConduitError) as raised:
        asyncio.run(call())
    assert raised.value.code == expected
    assert raised.value.status == (429 if expected == "model_not_ready" else 504)
