"""Hostile bodies on every POST route the server documents in its own /openapi.json (so routes added
later are covered without touching this file): each must get a 4xx with a JSON error body, never a
5xx, and never hang.

Two kinds: whole bodies that are not a usable JSON object (empty, null, an array, invalid UTF-8, 10k
levels of nesting, the wrong content-type, ...), and a route's own fields set one at a time to
hostile values (null, "", 1e309, 2**70, deep nesting, ...) over a body that is otherwise valid."""

import asyncio
import json
import time

import httpx
import pytest
import ray

from tests.e2e.conftest import EMBEDDING_MODEL, MODEL, SECOND_MODEL, VERTEX_ENV

pytestmark = pytest.mark.e2e
DEPTH = 10_000
# valid values for the fields a route needs, so that one hostile field is what the server judges;
# the small-window model keeps any request that turns out valid short
VALID = {
    "model": SECOND_MODEL,
    "messages": [{"role": "user", "content": "hi"}],
    "prompt": "hi",
    "input": "hi",
    "inputs": "hi",
    "tokens": [1, 2],
    "max_tokens": 2,
}
JSON = {"content-type": "application/json"}
HOSTILE_BODIES = {
    "empty": (b"", JSON),
    "null": (b"null", JSON),
    "array": (b'[{"model": "m"}]', JSON),
    "string": (b'"hello"', JSON),
    "number": (b"1e309", JSON),
    "truncated": (b'{"model": "m", "messages": [', JSON),
    "invalid_utf8": (b'{"model": "\xff\xfe", "prompt": "\xc3\x28", "messages": "\xed\xa0\x80"}', JSON),
    "lone_surrogate": (b'{"model": "\\ud800", "prompt": "\\udfff", "input": "\\ud800"}', JSON),
    "deep_array": (b"[" * DEPTH + b"]" * DEPTH, JSON),
    "deep_object": (b'{"a":' * DEPTH + b"1" + b"}" * DEPTH, JSON),
    "nan": (b'{"model": NaN, "temperature": Infinity, "max_tokens": -Infinity}', JSON),
    "text_plain": (b'{"model": "m"}', {"content-type": "text/plain"}),
    "form": (b"model=m&prompt=hi", {"content-type": "application/x-www-form-urlencoded"}),
    "no_content_type": (b'{"model": "m"}', {}),
}
HOSTILE_VALUES = {
    "null": "null",
    "empty_string": '""',
    "empty_list": "[]",
    "empty_object": "{}",
    "inf_float": "1e309",
    "huge_int": str(2**70),
    "negative_huge_int": str(-(2**70)),
    "nan": "NaN",
    "lone_surrogate": '"\\ud800"',
    "deep_list": "[" * 2000 + "]" * 2000,
    "long_string": json.dumps("x" * 200_000),
}


@pytest.fixture(scope="module")
def post_routes(server) -> list[tuple[str, dict]]:
    """(path with its parameters filled in, the JSON schema of its body or {}) for every POST route."""
    spec = httpx.get(f"{server}/openapi.json").json()
    routes = []
    for path, ops in spec["paths"].items():
        if "post" not in ops:
            continue
        body = ops["post"].get("requestBody", {}).get("content", {}).get("application/json", {})
        schema = resolve(spec, body.get("schema", {}))
        routes.append((fill_path(path), schema))
    assert len(routes) >= 5, routes  # the OpenAI routes at least
    return routes


def resolve(spec: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    if ref:
        return resolve(spec, spec["components"]["schemas"][ref.rsplit("/", 1)[-1]])
    return schema


def fill_path(path: str) -> str:
    model = EMBEDDING_MODEL if "embed" in path else SECOND_MODEL
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        path = path[:start] + model + path[end + 1:]
    return path


def base_body(path: str, schema: dict) -> dict:
    body = {name: VALID[name] for name in schema.get("properties", {}) if name in VALID}
    if "embed" in path:
        body.pop("max_tokens", None)
        body["model"] = EMBEDDING_MODEL
    return body


async def post_all(server: str, requests: list[tuple[str, bytes, dict, str]]) -> list[tuple[str, int]]:
    """(label, status) per (path, body, headers, label); up to 16 in flight, each bounded in time. An
    error whose body is not a JSON object (an API's error shape) counts as status 0."""
    limit = asyncio.Semaphore(16)

    async with httpx.AsyncClient(base_url=server, timeout=60) as http:

        async def one(path: str, content: bytes, headers: dict, label: str) -> int:
            async with limit:
                response = await http.post(path, content=content, headers=headers)
            return response.status_code if response.is_success or is_json_object(response) else 0

        statuses = await asyncio.gather(*(one(*r) for r in requests))
    return [(f"POST {path} {label}", status) for (path, _, _, label), status in zip(requests, statuses)]


def is_json_object(response: httpx.Response) -> bool:
    try:
        return isinstance(response.json(), dict)
    except ValueError:
        return False


def assert_all_4xx(results: list[tuple[str, int]]):
    bad = [f"{status} {label}" for label, status in results if not 400 <= status < 500]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("kind", HOSTILE_BODIES)
def test_hostile_body_gets_4xx(server, post_routes, kind):
    content, headers = HOSTILE_BODIES[kind]
    assert_all_4xx(asyncio.run(post_all(server, [(path, content, headers, kind) for path, _ in post_routes])))


@pytest.mark.parametrize("kind", HOSTILE_VALUES)
def test_hostile_field_value_is_never_a_server_error(server, post_routes, kind):
    """Each documented top-level field of each route, set to the hostile value in an otherwise
    valid body: a 2xx where the value happens to be acceptable, else a 4xx, never a 5xx."""
    value = HOSTILE_VALUES[kind]
    requests = []
    for path, schema in post_routes:
        body = base_body(path, schema)
        for field in schema.get("properties", {}):
            others = {k: v for k, v in body.items() if k != field}
            prefix = json.dumps(others)[:-1] + (", " if others else "")
            content = f'{prefix}"{field}": {value}}}'.encode()
            requests.append((path, content, JSON, f"{field}={kind}"))
    results = asyncio.run(post_all(server, requests))
    bad = [f"{status} {label}" for label, status in results if not 200 <= status < 500]
    assert not bad, "\n".join(bad)


# --- one request must never stop a replica -------------------------------------------------------------
TINY = 1e-300  # 0 in float32: the review's trigger for NaN probabilities
# (label, path, body, expected status, the field a 400 must name) through every wire format
ENGINE_TRIGGERS = [
    ("openai chat temperature", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": TINY}, 200, None),
    ("openai chat repetition_penalty", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0.7,
      "repetition_penalty": TINY}, 400, "repetition_penalty"),
    ("openai chat seed", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 2**64}, 400, "seed"),
    ("openai completion echo logprobs", "/v1/completions",
     {"model": MODEL, "prompt": "hi there", "max_tokens": 4, "temperature": TINY, "echo": True, "logprobs": 2}, 200, None),
    ("openai completion seed", "/v1/completions",
     {"model": MODEL, "prompt": "hi", "max_tokens": 4, "seed": -(2**63) - 1}, 400, "seed"),
    ("anthropic temperature", "/v1/messages",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": TINY}, 200, None),
    ("bedrock temperature", f"/model/{MODEL}/converse",
     {"messages": [{"role": "user", "content": [{"text": "hi"}]}], "inferenceConfig": {"maxTokens": 4, "temperature": TINY}},
     200, None),
    ("azure seed", f"/openai/deployments/{MODEL}/chat/completions?api-version=2024-10-21",
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 2**64}, 400, "seed"),
    ("tgi temperature", "/generate",
     {"inputs": "hi", "parameters": {"max_new_tokens": 4, "temperature": TINY}}, 200, None),
    ("tgi repetition_penalty", "/generate",
     {"inputs": "hi", "parameters": {"max_new_tokens": 4, "do_sample": True, "repetition_penalty": TINY}},
     422, "repetition_penalty"),  # TGI answers validation errors with 422
    ("tgi seed", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 4, "seed": 2**64}}, 422, "seed"),
    ("cloudflare temperature", f"/client/v4/accounts/acc/ai/run/{MODEL}",
     {"prompt": "hi", "max_tokens": 4, "temperature": TINY}, 200, None),
    ("cloudflare repetition_penalty", f"/client/v4/accounts/acc/ai/run/{MODEL}",
     {"prompt": "hi", "max_tokens": 4, "repetition_penalty": TINY}, 400, "repetition_penalty"),
    ("vertex temperature", VERTEX_ENV["AIP_PREDICT_ROUTE"],
     {"instances": [{"prompt": "hi", "max_tokens": 4, "temperature": TINY}]}, 200, None),
    ("vertex seed", VERTEX_ENV["AIP_PREDICT_ROUTE"],
     {"instances": [{"prompt": "hi", "max_tokens": 4, "seed": 2**64}]}, 400, "seed"),
]


def model_replicas() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::conduit#Model-{MODEL}#")}


def greedy_chat(prompt: str, stream: bool) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 48,
            "temperature": 0, "ignore_eos": True, "stream": stream}


async def stream_text(http: httpx.AsyncClient, body: dict, headers: dict | None = None) -> str:
    text = ""
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers or {}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                payload = json.loads(line[6:])
                assert "error" not in payload, payload
                text += payload["choices"][0]["delta"].get("content") or ""
    return text


def test_engine_triggers_fail_only_their_request(server):
    """Each trigger, through each wire format, while 8 greedy streams run on the same replica: the
    trigger gets its answer (a 400 naming the field, or a 200 where the value is valid), the 8 finish
    with their own greedy output, and the model replica is the same one (never restarted)."""
    prompts = [f"stream {i} of eight" for i in range(8)]
    replicas = model_replicas()

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            alone = [(await http.post("/v1/chat/completions", json=greedy_chat(p, False))).json()
                     ["choices"][0]["message"]["content"] for p in prompts]
            streams = [asyncio.create_task(stream_text(http, greedy_chat(p, True))) for p in prompts]
            await asyncio.sleep(0.3)  # the streams are decoding
            answers = [await http.post(path, json=body) for _, path, body, _, _ in ENGINE_TRIGGERS]
            return alone, await asyncio.gather(*streams), answers

    alone, streamed, answers = asyncio.run(run())
    wrong = [f"{label}: {r.status_code} {r.text[:300]}" for (label, _, _, status, field), r in zip(ENGINE_TRIGGERS, answers)
             if r.status_code != status or (field and field not in r.text)]
    assert not wrong, "\n".join(wrong)
    assert streamed == alone, "a stream running beside the triggers changed or ended"
    assert model_replicas() == replicas, "the model replica was restarted"


def test_shared_request_id_never_merges_outputs(server):
    """8 concurrent requests that all send `x-request-id: abc`: each gets exactly its own greedy output
    (the engine keys requests by ids of its own; the client's is echoed and logged only)."""
    prompts = [f"request id {i} shared" for i in range(8)]

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            alone = [await stream_text(http, greedy_chat(p, True)) for p in prompts]
            shared = await asyncio.gather(*(stream_text(http, greedy_chat(p, True), {"x-request-id": "abc"})
                                            for p in prompts))
            return alone, shared

    alone, shared = asyncio.run(run())
    assert shared == alone


def test_hostile_responses_requests_get_4xx_in_the_responses_shape(server):
    """OpenAI's Responses API: unknown item types, previous_response_id that does not exist or was
    deleted, a 10k-item input, and every route given a deleted id: each a 4xx with OpenAI's error
    object, never a 5xx; the server keeps serving."""
    def create(**fields) -> httpx.Response:
        return httpx.post(f"{server}/v1/responses", json={"model": SECOND_MODEL, "max_output_tokens": 2, **fields},
                          timeout=60)

    deleted = create(input="hi").json()["id"]
    assert httpx.delete(f"{server}/v1/responses/{deleted}", timeout=10).status_code == 200
    answers = {
        "unknown item type": create(input=[{"type": "telepathy", "content": "hi"}]),
        "reasoning item": create(input=[{"type": "reasoning", "id": "rs_1", "summary": []}]),
        "image part": create(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
        "item not an object": create(input=["hi"]),
        "empty input": create(input=[]),
        "missing previous": create(input="hi", previous_response_id="resp_does_not_exist"),
        "deleted previous": create(input="hi", previous_response_id=deleted),
        "10k items": create(input=[{"role": "user", "content": "hi"}] * 10_000),
        "10k calls": create(input=[{"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"}
                                   for i in range(10_000)]),
        "output without call": create(input=[{"type": "function_call_output", "call_id": "x", "output": "y"}]),
        "built-in tool": create(input="hi", tools=[{"type": "web_search"}]),
        "retrieve deleted": httpx.get(f"{server}/v1/responses/{deleted}", timeout=10),
        "delete deleted": httpx.delete(f"{server}/v1/responses/{deleted}", timeout=10),
        "cancel deleted": httpx.post(f"{server}/v1/responses/{deleted}/cancel", timeout=10),
        "items of deleted": httpx.get(f"{server}/v1/responses/{deleted}/input_items", timeout=10),
        "items limit 0": httpx.get(f"{server}/v1/responses/{deleted}/input_items?limit=0", timeout=10),
    }
    wrong = [f"{label}: {r.status_code} {r.text[:200]}" for label, r in answers.items()
             if not 400 <= r.status_code < 500 or not isinstance(r.json().get("error", {}).get("message"), str)]
    assert not wrong, "\n".join(wrong)
    assert answers["10k items"].json()["error"]["param"] == "input"
    assert answers["deleted previous"].status_code == answers["retrieve deleted"].status_code == 404
    assert create(input="still serving").status_code == 200


def test_hostile_files_and_batches_get_4xx(server):
    """OpenAI's Files and Batch APIs: a non-JSONL file, one of another purpose, an oversized one, a
    batch of an unknown endpoint or window, ids that do not exist, and a file of lines for another
    endpoint (a batch that fails validation, never one that hangs): 4xx or a failed batch, never 5xx."""
    def upload(data: bytes, purpose: str = "batch") -> httpx.Response:
        return httpx.post(f"{server}/v1/files", files={"file": ("x.jsonl", data)}, data={"purpose": purpose},
                          timeout=60)

    def create(**fields) -> httpx.Response:
        return httpx.post(f"{server}/v1/batches", json={"endpoint": "/v1/chat/completions",
                                                        "completion_window": "24h", **fields}, timeout=60)

    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": SECOND_MODEL, "input": "x"}}
    good = upload((json.dumps(line) + "\n").encode())
    assert good.status_code == 200, good.text
    answers = {
        "not JSONL": upload(b"hello world\n"),
        "not UTF-8": upload(b"\xff\xfe\xfd\n"),
        "empty file": upload(b""),
        "another purpose": upload(b"{}\n", purpose="fine-tune"),
        "no file part": httpx.post(f"{server}/v1/files", data={"purpose": "batch"}, timeout=60),
        "oversized": upload(b'{"x": "' + b"y" * 2_000_000 + b'"}\n'),
        "unknown endpoint": create(input_file_id=good.json()["id"], endpoint="/v1/telepathy"),
        "unknown window": create(input_file_id=good.json()["id"], completion_window="1h"),
        "missing file": create(input_file_id="file-does-not-exist"),
        "retrieve missing file": httpx.get(f"{server}/v1/files/file-does-not-exist", timeout=10),
        "content of missing file": httpx.get(f"{server}/v1/files/file-does-not-exist/content", timeout=10),
        "retrieve missing batch": httpx.get(f"{server}/v1/batches/batch_does_not_exist", timeout=10),
        "cancel missing batch": httpx.post(f"{server}/v1/batches/batch_does_not_exist/cancel", timeout=10),
        "batches limit 0": httpx.get(f"{server}/v1/batches?limit=0", timeout=10),
    }
    wrong = [f"{label}: {r.status_code} {r.text[:200]}" for label, r in answers.items()
             if not 400 <= r.status_code < 500 or not isinstance(r.json().get("error", {}).get("message"), str)]
    assert not wrong, "\n".join(wrong)
    batch = create(input_file_id=good.json()["id"])  # its one line asks for another endpoint than the batch's
    assert batch.status_code == 200, batch.text
    deadline = time.monotonic() + 30
    while (state := httpx.get(f"{server}/v1/batches/{batch.json()['id']}", timeout=10).json())["status"] == "validating":
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["status"] == "failed" and state["errors"]["data"][0]["code"] == "invalid_url"
