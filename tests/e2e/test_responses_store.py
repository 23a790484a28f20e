"""Stored responses on apps with two API keys and two ingress replicas, beside the shared one: once
with an SQLite file, once with a real PostgreSQL server (tests/pg_server.py). Another key's id is a
404 everywhere; each replica reads what the other stored; a stored response survives the app's
restart (deleted and deployed again: new replicas, new processes)."""

import hashlib
import secrets
import time
import uuid
from pathlib import Path

import httpx
import pytest
from openai import NotFoundError, OpenAI

from tests.e2e.variants import deploy, model_args
from tests.pg_server import postgres_server

pytestmark = pytest.mark.e2e
MODEL = "store-demo"
KEY_A, KEY_B = (f"sk-conduit-test-{secrets.token_hex(12)}" for _ in range(2))
# unbuffered replica logs, so the test can tell which replica served which call (by its x-request-id)
UNBUFFERED = {"num_cpus": 0.01, "runtime_env": {"env_vars": {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}}}


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def app(request, server, model_path, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp(f"store-{request.param}")
    keys_file = root / "api_keys.sha256"
    keys_file.write_text("".join(hashlib.sha256(k.encode()).hexdigest() + "\n" for k in (KEY_A, KEY_B)))
    url = f"sqlite:///{root / 'conduit.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres")
    name = f"store-{request.param}"
    args = {"models": [model_args(model_path, MODEL)], "auth": {"api_keys_file": str(keys_file)},
            "store": {"url": url}}
    options = {"Ingress": {"num_replicas": 2, "ray_actor_options": UNBUFFERED}}
    base = deploy(server, name, args, options)
    yield {"base": base, "name": name, "args": args, "options": options, "backend": request.param}
    serve.delete(name, _blocking=False)


def sdk(app, key: str) -> OpenAI:
    return OpenAI(base_url=f"{app['base']}/v1", api_key=key, max_retries=0)


def tagged(request_id: str) -> dict:
    return {"extra_headers": {"x-request-id": request_id}}


def test_another_keys_response_is_a_404(app):
    a, b = sdk(app, KEY_A), sdk(app, KEY_B)
    mine = a.responses.create(model=MODEL, input="Hello", max_output_tokens=4, temperature=0)
    for call in (lambda: b.responses.retrieve(mine.id), lambda: b.responses.delete(mine.id),
                 lambda: b.responses.cancel(mine.id), lambda: b.responses.input_items.list(mine.id),
                 lambda: b.responses.create(model=MODEL, input="x", previous_response_id=mine.id, max_output_tokens=2)):
        with pytest.raises(NotFoundError) as raised:
            call()
        assert raised.value.body["message"].endswith("not found.")
    assert a.responses.retrieve(mine.id).output_text == mine.output_text  # untouched by B's delete
    follow_up = a.responses.create(model=MODEL, input="x", previous_response_id=mine.id, max_output_tokens=2)
    assert follow_up.previous_response_id == mine.id


def test_each_replica_reads_what_the_other_stored(app):
    client = sdk(app, KEY_A)
    created = {}
    for i in range(8):
        rid = f"create-{uuid.uuid4().hex}"
        created[rid] = client.responses.create(model=MODEL, input=f"Hello {i}", max_output_tokens=2, temperature=0,
                                               **tagged(rid)).id
    reads = {}
    for creation, response_id in created.items():
        for _ in range(4):
            rid = f"read-{uuid.uuid4().hex}"
            assert client.responses.retrieve(response_id, **tagged(rid)).id == response_id
            reads[rid] = creation
    time.sleep(1)  # the access lines reach the log files
    served_by = replica_of([*created, *reads], app["name"])
    crossed = [rid for rid, creation in reads.items() if served_by[rid] != served_by[creation]]
    assert crossed, f"no read reached the replica that did not store the response ({set(served_by.values())})"


@pytest.mark.parametrize("app", ["sqlite"], indirect=True)  # the default store, the one `conduit run` keeps on disk
def test_a_stored_response_survives_a_restart(app):
    from ray import serve

    client = sdk(app, KEY_A)
    before = client.responses.create(model=MODEL, input="Remember me", max_output_tokens=4, temperature=0)
    serve.delete(app["name"])
    base = deploy(app["base"].rsplit("/", 1)[0], app["name"], app["args"], app["options"])
    after = OpenAI(base_url=f"{base}/v1", api_key=KEY_A, max_retries=0).responses.retrieve(before.id)
    assert after.model_dump() == before.model_dump()


def replica_of(request_ids: list[str], app_name: str) -> dict[str, str]:
    """Each request id -> the ingress replica whose access log has it."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    texts = {p.name: p.read_text(errors="replace") for p in logs.glob(f"replica_{app_name}_Ingress_*.log")}
    found = {rid: next((name for name, text in texts.items() if rid in text), None) for rid in request_ids}
    assert None not in found.values(), "an access line is missing from the replica logs"
    return found


def test_unknown_ids_are_404s_in_the_responses_shape(app):
    r = httpx.get(f"{app['base']}/v1/responses/resp_nope", headers={"authorization": f"Bearer {KEY_A}"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
