"""OpenAI's published contract, for tests: `validate(obj, "CreateChatCompletionResponse")` checks a
response body (or one stream event) against a schema of OpenAI's OpenAPI document, vendored
unchanged in tests/data/openai-openapi/ (see SOURCE there), and raises AssertionError listing every
violation with its path.

Where the document and the live API differ, the live API wins, and only as far as listed here:
- `"nullable": true` (OpenAPI 3.0's keyword, which a 3.1 document like this one no longer
  defines) still means "or null", as its authors meant (e.g. a stream chunk's `finish_reason`).
- `LIVE_ALLOWANCES`: each field where the live API sends what the document does not allow, with
  the one other shape accepted there (most often null).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOCUMENT = Path(__file__).parent / "data" / "openai-openapi" / "openapi.json"
_URI = "urn:openai-openapi"

NULL = {"type": "null"}
_CHOICE = "CreateCompletionResponse/properties/choices/items/properties"
# Each: a JSON pointer into components/schemas -> (the other shape the live API sends there, why).
LIVE_ALLOWANCES: dict[str, tuple[dict, str]] = {
    # completions share one schema for whole responses and stream chunks; chunks before the last
    # have `"finish_reason": null`, as chat chunks do
    f"{_CHOICE}/finish_reason": (NULL, "completion stream chunks before the last"),
    # with `echo`, the prompt's first token has no logprob: null in both lists
    f"{_CHOICE}/logprobs/anyOf/0/properties/token_logprobs/items": (NULL, "echo: the first prompt token"),
    f"{_CHOICE}/logprobs/anyOf/0/properties/top_logprobs/items": (NULL, "echo: the first prompt token"),
    # `encoding_format: "base64"` (the openai SDK's default): the vector as base64 of float32s
    "Embedding/properties/embedding": ({"type": "string", "contentEncoding": "base64"}, "encoding_format base64"),
    # a response not yet ended (response.created, a queued background one) has `"usage": null`
    "Response/allOf/2/properties/usage": (NULL, "Responses before they end"),
    # the deprecated `user` of a response whose request set none
    "ModelResponseProperties/properties/user": (NULL, "Responses without user"),
}


def validate(obj, schema_name: str) -> None:
    """AssertionError naming every place `obj` breaks schema `schema_name` (after the allowances)."""
    problems = errors(obj, schema_name)
    assert not problems, f"{schema_name}: " + "\n".join(problems) + f"\nin: {json.dumps(obj)[:2000]}"


def errors(obj, schema_name: str) -> list[str]:
    """Each violation as `path: message` (empty when `obj` keeps to the schema)."""
    return [_describe(e) for e in sorted(_validator(schema_name).iter_errors(obj), key=lambda e: list(e.path))]


def schema_names() -> set[str]:
    return set(_document()["components"]["schemas"])


def _describe(error) -> str:
    path = "/".join(str(p) for p in error.absolute_path) or "(root)"
    detail = "; ".join(sorted({c.message for c in error.context}))[:500] if error.context else ""
    return f"{path}: {error.message[:300]}" + (f" [{detail}]" if detail else "")


@cache
def _validator(schema_name: str) -> Draft202012Validator:
    if schema_name not in _document()["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in OpenAI's OpenAPI document")
    registry = Registry().with_resource(_URI, Resource.from_contents(_document(), default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"{_URI}#/components/schemas/{schema_name}"}, registry=registry)


@cache
def _document() -> dict:
    document = json.loads(DOCUMENT.read_text())
    schemas = document["components"]["schemas"]
    for pointer, (other, _why) in LIVE_ALLOWANCES.items():
        *parents, last = pointer.split("/")
        holder = schemas
        for key in parents:
            holder = holder[int(key)] if isinstance(holder, list) else holder[key]
        holder[last] = {"anyOf": [holder[last], other]}  # a KeyError here: the document moved on, recheck the list
    document["components"] = _nullable_as_null(document["components"])
    return document


def _or_null(schema: dict) -> dict:
    return {"anyOf": [schema, NULL]}


def _nullable_as_null(node):
    if isinstance(node, list):
        return [_nullable_as_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_as_null(value) for key, value in node.items()}
    if node.get("nullable") is True:
        del node["nullable"]
        return _or_null(node)
    return node
