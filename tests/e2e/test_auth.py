"""API keys and per-key rate limits on a second app ("keyed", 2 ingress replicas) beside the default
one: every route refuses calls without a valid key in each header form, takes them with one, a
per-key limit holds across both ingress replicas, and no key reaches the logs."""

import asyncio
import hashlib
import secrets
import time
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from tests.e2e.conftest import VERTEX_ENV
from tests.e2e.variants import deploy, model_args

pytestmark = pytest.mark.e2e
APP = "keyed"
MODEL = "keyed-demo"
RPM = 40
KEY_A, KEY_B = (f"sk-conduit-test-{secrets.token_hex(12)}" for _ in range(2))
WRONG_KEY = f"sk-wrong-{secrets.token_hex(12)}"
ORIGIN = "https://app.example"
HEALTH_PATHS = ("/health", VERTEX_ENV["AIP_HEALTH_ROUTE"])
HEADER_FORMS = [lambda k: {"authorization": f"Bearer {k}"}, lambda k: {"x-api-key": k}, lambda k: {"api-key": k}]


@pytest.fixture(scope="module")
def keyed(server, model_path, tmp_path_factory):
    from ray import serve

    keys_file = tmp_path_factory.mktemp("auth") / "api_keys.sha256"
    keys_file.write_text("".join(hashlib.sha256(k.encode()).hexdigest() + "\n" for k in (KEY_A, KEY_B)))
    args = {"models": [model_args(model_path, MODEL)],
            "auth": {"api_keys_file": str(keys_file)},
            "rate_limits": {"requests_per_minute": RPM},
            "ingress": {"cors_origins": [ORIGIN]}}
    # unbuffered replica logs (RAY_SERVE_THROUGHPUT_OPTIMIZED buffers 1000 lines), so the test can read them
    unbuffered = {"num_cpus": 0.01, "runtime_env": {"env_vars": {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}}}
    yield deploy(server, APP, args, {"Ingress": {"num_replicas": 2, "ray_actor_options": unbuffered}})
    serve.delete(APP, _blocking=False)  # an ingress takes ~30 s to drain; nothing waits on it


def valid_calls() -> list[tuple[str, str, dict | None]]:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return [
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
        ("GET", "/v1/models", None),
        ("GET", f"/v1/models/{MODEL}", None),
        ("POST", "/tokenize", {"model": MODEL, "prompt": "hi"}),
        ("POST", "/detokenize", {"model": MODEL, "tokens": [5, 6]}),
        ("GET", "/openapi.json", None),
    ]


def test_every_route_needs_a_key(keyed):
    spec = httpx.get(f"{keyed}/openapi.json", headers={"x-api-key": KEY_A}, timeout=10).json()
    routes = [(method.upper(), path.replace("{model}", MODEL).replace("{", "").replace("}", ""))
              for path, methods in spec["paths"].items() for method in methods]
    assert len(routes) >= 6
    with httpx.Client(base_url=keyed, timeout=30) as http:
        for method, path in routes + [("GET", "/openapi.json"), ("GET", "/docs")]:
            if path in (*HEALTH_PATHS, "/metrics"):
                continue
            for headers in [{}] + [form(WRONG_KEY) for form in HEADER_FORMS]:
                r = http.request(method, path, headers=headers, json={})
                assert r.status_code == 401, (method, path, headers.keys(), r.text)
                if path.startswith("/v1/messages"):  # Anthropic's shape on Anthropic's routes
                    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
                elif path in ("/v1/chat/completions", "/v1/completions", "/v1/models"):  # OpenAI's
                    assert r.json()["error"]["type"] == "authentication_error"
            ok = http.request(method, path, headers=HEADER_FORMS[0](KEY_A), json={})
            assert ok.status_code != 401, (method, path)
        for path in HEALTH_PATHS:  # auth.protect_health is off
            assert http.get(path).status_code == 200, path
        assert http.get("/metrics").status_code == 401  # auth.open_metrics is off


def test_valid_key_in_each_header_form(keyed):
    with httpx.Client(base_url=keyed, timeout=60) as http:
        for form in HEADER_FORMS:
            for method, path, body in valid_calls():
                r = http.request(method, path, headers=form(KEY_A), json=body)
                assert r.status_code == 200, (method, path, r.text)


def test_cors_only_where_configured(keyed, server):
    preflight = {"origin": ORIGIN, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}
    allowed = httpx.options(f"{keyed}/v1/chat/completions", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{keyed}/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    default_app = httpx.options(f"{server}/v1/chat/completions", headers=preflight)  # no cors_origins there
    assert "access-control-allow-origin" not in default_app.headers


def test_openai_sdk_with_and_without_key(keyed):
    good = OpenAI(base_url=f"{keyed}/v1", api_key=KEY_A, max_retries=0)
    reply = good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.choices[0].message.content is not None
    with pytest.raises(AuthenticationError) as refused:
        OpenAI(base_url=f"{keyed}/v1", api_key=WRONG_KEY, max_retries=0).models.list()
    assert refused.value.status_code == 401 and "Incorrect API key" in refused.value.message


def test_per_key_rate_limit_holds_across_two_ingress_replicas(keyed):
    if time.time() % 60 > 50:  # windows are wall-clock minutes: keep the burst inside one
        time.sleep(61 - time.time() % 60)
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=keyed, timeout=30) as http:
            sem = asyncio.Semaphore(6)

            async def one():
                async with sem:
                    return await http.post("/tokenize", headers={"x-api-key": KEY_B}, json={"model": MODEL, "prompt": "x"})

            return await asyncio.gather(*(one() for _ in range(RPM + 20)))

    responses = asyncio.run(burst())
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(limited) == len(responses)
    # exact at the limit, save at most one leased unit stranded per replica
    assert RPM - 2 <= len(ok) <= RPM, len(ok)
    r = limited[0]
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-limit-requests"] == str(RPM)
    assert r.headers["x-ratelimit-remaining-requests"] == "0" and r.headers["x-ratelimit-reset-requests"].endswith("s")
    assert ok[0].headers["x-ratelimit-limit-requests"] == str(RPM)
    # key A has its own budget
    assert httpx.post(f"{keyed}/tokenize", headers={"x-api-key": KEY_A}, json={"model": MODEL, "prompt": "x"}).status_code == 200
    assert len(replica_logs_with(f"POST /{APP}/tokenize 200")) == 2, "both ingress replicas took requests"


def session_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"


def replica_logs_with(text: str) -> list[Path]:
    return [p for p in (session_logs() / "serve").glob(f"replica_{APP}_Ingress_*.log") if text in p.read_text(errors="replace")]


def test_keys_never_reach_the_logs(keyed):
    # a failing call with each key, so error paths are exercised too
    for key in (KEY_A, WRONG_KEY):
        httpx.post(f"{keyed}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, json={"model": "nope"})
    hits = [p for p in session_logs().rglob("*") if p.is_file()
            and any(k.encode() in p.read_bytes() for k in (KEY_A, KEY_B, WRONG_KEY))]
    assert not hits
    assert replica_logs_with("auth ON: 2 API key(s)"), "the start-up line says what protects the server"
