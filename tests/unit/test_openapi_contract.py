"""The contract checker of tests/openapi_contract.py: the vendored document is the one named in
SOURCE.md, each allowance still points at a field, and a violation is found and named."""

import hashlib
import re

import pytest

from tests.openapi_contract import DOCUMENT, LIVE_ALLOWANCES, errors, schema_names, validate

CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}]}


def test_document_is_the_vendored_commit():
    blob = DOCUMENT.read_bytes()
    git_blob = hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()
    source = (DOCUMENT.parent / "SOURCE.md").read_text()
    assert re.search(rf"git blob `{git_blob}`", source), "openapi.json changed: update SOURCE.md"


def test_every_allowance_points_at_a_field():
    # the document loads with each allowance applied (a moved field raises KeyError)
    assert "Embedding" in schema_names() and len(LIVE_ALLOWANCES) >= 1
    validate({"object": "embedding", "index": 0, "embedding": "AACAPw=="}, "Embedding")


def test_violations_are_named_with_their_path():
    validate(CHUNK, "CreateChatCompletionStreamResponse")  # nullable finish_reason / logprobs
    bad = {**CHUNK, "choices": [{**CHUNK["choices"][0], "finish_reason": "done"}]}
    [problem] = errors(bad, "CreateChatCompletionStreamResponse")
    assert problem.startswith("choices/0/finish_reason:")
    message = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop",
                            "logprobs": None}]}
    with pytest.raises(AssertionError, match="'refusal' is a required property"):
        validate(message, "CreateChatCompletionResponse")


def test_unknown_schema_is_an_error():
    with pytest.raises(KeyError):
        errors({}, "NoSuchSchema")
