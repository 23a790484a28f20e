"""Conduit's errors on Bedrock paths, parsed by botocore as boto3 does: each status becomes the
exception class boto3 raises."""

import botocore.session
import pytest
from botocore.parsers import RestJSONParser

from app.api.bedrock import error_response
from app.api.errors import ConduitError


@pytest.fixture(scope="module")
def client():
    return botocore.session.get_session().create_client(
        "bedrock-runtime", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")


@pytest.mark.parametrize("status, code", [
    (400, "ValidationException"),
    (404, "ResourceNotFoundException"),
    (413, "ValidationException"),
    (429, "ThrottlingException"),
    (500, "InternalServerException"),
    (503, "ServiceUnavailableException"),
])
def test_status_maps_to_boto3_exception(client, status, code):
    shape = client.meta.service_model.operation_model("Converse").output_shape
    response = error_response(ConduitError("the reason", status))
    parsed = RestJSONParser().parse(
        {"status_code": response.status_code, "headers": dict(response.headers), "body": response.body}, shape)
    assert parsed["Error"] == {"Code": code, "Message": "the reason"}
    assert client.exceptions.from_code(code).__name__ == code
