"""Schemas over guided decoding's caps, through the real server: a 400 in OpenAI's shape naming the
field, answered at the edge (before this, a 50-byte pattern held the ingress loop for seconds in
xgrammar), and the server goes on serving guided requests."""

import json
import time

import httpx
import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "Who?"}]


def deep(levels: int) -> dict:
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def chat(server: str, schema: dict, **extra) -> httpx.Response:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    return httpx.post(f"{server}/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "messages": MESSAGES, "response_format": fmt, **extra})


@pytest.mark.parametrize("schema, message", [
    (deep(40), "nests deeper than 32 levels"),
    ({"type": "string", "pattern": "^[a-z]{4000,8000}$"}, "repeat 8000 times in all"),
])
def test_schema_over_a_cap_is_400_naming_the_field_and_serving_goes_on(server, schema, message):
    started = time.monotonic()
    response = chat(server, schema)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format.json_schema.schema"
    assert error["message"].startswith("response_format.json_schema.schema: ") and message in error["message"]
    assert time.monotonic() - started < 10  # refused by the caps, not after a compile
    ok = chat(server, {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
              max_tokens=40, temperature=0)
    assert ok.status_code == 200, ok.text
    assert isinstance(json.loads(ok.json()["choices"][0]["message"]["content"])["n"], int)
