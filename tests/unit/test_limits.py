"""Rate limits (two replicas' limiters over one shared counter, as in the cluster), API keys and
the deadline header, without Ray."""

import asyncio
import hashlib

import pytest

from app.api.errors import ConduitError
from app.auth import KeyStore, check_exposure, presented_key
from app.config import AuthConfig, ConfigError, RateLimitConfig
from app.limits import WINDOW_S, Ask, RateLimiter, WindowCounts


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiters(n: int, clock: Clock, **limits) -> tuple[list[RateLimiter], list[int]]:
    """`n` replicas' limiters sharing one counter, on `clock` (their waits advance it); also returns
    the list of counter calls made."""
    counts = WindowCounts(clock)
    calls: list[int] = []

    async def take(*args):
        calls.append(1)
        return counts.take(*args)

    async def sleep(seconds: float) -> None:
        clock.now += seconds
        await asyncio.sleep(0)

    return [RateLimiter(RateLimitConfig(**limits), take, clock, sleep) for _ in range(n)], calls


async def admitted(limiter: RateLimiter, key: str) -> bool:
    try:
        await limiter.admit(key)
        return True
    except ConduitError as e:
        assert e.status == 429 and e.code == "rate_limit_exceeded"
        assert int(e.headers["retry-after"]) >= 1 and "x-ratelimit-remaining-requests" in e.headers
        return False


def test_requests_per_minute_hold_across_replicas_per_key():
    clock = Clock()

    async def run():
        (a, b), _ = limiters(2, clock, requests_per_minute=10)
        results = []
        for i in range(30):  # alternate replicas, as the proxy spreads calls
            results.append(await admitted((a, b)[i % 2], "k1"))
            await asyncio.sleep(0)  # let background top-ups run
        other = await admitted(b, "k2")
        return results, other

    results, other = asyncio.run(run())
    assert sum(results) == 10 and all(results[:10])
    assert other, "another key has its own budget"


def test_window_reset_restores_the_budget():
    clock = Clock(60 * 100 + 5)

    async def run():
        (a,), _ = limiters(1, clock, requests_per_minute=3)
        first = [await admitted(a, "k") for _ in range(4)]
        clock.now += WINDOW_S
        return first, await admitted(a, "k")

    first, after = asyncio.run(run())
    assert first == [True, True, True, False] and after


def test_far_from_the_limit_requests_do_not_wait_for_the_counter():
    clock = Clock()

    async def run():
        (a,), calls = limiters(1, clock, requests_per_minute=5000)
        for _ in range(200):
            await a.admit("k")
            await asyncio.sleep(0)
        return len(calls)

    assert asyncio.run(run()) <= 200 // (5000 // 50) + 2  # one counter call per leased batch


def test_tokens_per_minute_and_headers():
    clock = Clock()

    async def run():
        (a, b), _ = limiters(2, clock, tokens_per_minute=100)
        headers = await a.admit("k")
        a.charge("k", 120)
        await a._sync("k", a.keys["k"], Ask())  # the background report, made now
        await b._sync("k", b._view("k"), Ask())
        with pytest.raises(ConduitError) as refused:
            await b.admit("k")
        return headers, refused.value

    headers, refused = asyncio.run(run())
    assert headers["x-ratelimit-limit-tokens"] == "100" and headers["x-ratelimit-remaining-tokens"] == "100"
    assert refused.status == 429 and refused.type == "tokens" and refused.headers["x-ratelimit-remaining-tokens"] == "0"


def test_key_store_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDUIT_TEST_KEYS", "alpha-key, beta-key")
    hashes = tmp_path / "keys.sha256"
    hashes.write_text("# comment\n" + hashlib.sha256(b"gamma-key").hexdigest() + "\n")
    store = KeyStore.from_config(AuthConfig(api_keys_env="CONDUIT_TEST_KEYS", api_keys_file=str(hashes)))
    assert len(store.digests) == 3
    assert store.identify("beta-key") and store.identify("gamma-key")
    assert store.identify("alpha-key") != store.identify("beta-key")
    assert store.identify("wrong") is None and store.identify(None) is None
    assert "beta-key" not in store.identify("beta-key")


def test_key_store_refuses_bad_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("CONDUIT_NO_SUCH_VAR", raising=False)
    with pytest.raises(ConfigError, match="api_keys_env"):
        KeyStore.from_config(AuthConfig(api_keys_env="CONDUIT_NO_SUCH_VAR"))
    plaintext = tmp_path / "keys"
    plaintext.write_text("sk-my-secret-key\n")
    with pytest.raises(ConfigError, match="line 1") as e:
        KeyStore.from_config(AuthConfig(api_keys_file=str(plaintext)))
    assert "sk-my-secret-key" not in str(e.value)


def test_presented_key_header_forms():
    assert presented_key({"authorization": "Bearer k1"}) == "k1"
    assert presented_key({"authorization": "bearer k1"}) == "k1"
    assert presented_key({"x-api-key": "k2"}) == "k2"
    assert presented_key({"api-key": "k3"}) == "k3"
    assert presented_key({"authorization": "Basic xyz", "api-key": "k3"}) == "k3"
    assert presented_key({}) is None


def test_no_keys_means_loopback_only():
    check_exposure(AuthConfig(), "127.0.0.1")
    check_exposure(AuthConfig(), "::1")
    check_exposure(AuthConfig(api_keys_env="KEYS"), "0.0.0.0")
    check_exposure(AuthConfig(allow_unauthenticated=True), "0.0.0.0")
    with pytest.raises(ConfigError, match="http_options.host"):
        check_exposure(AuthConfig(), "0.0.0.0")


def test_conduit_validate_refuses_a_public_host_without_keys(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from app.cli import cli
    from app.config import PROJECT_ROOT

    raw = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    raw["http_options"]["host"] = "0.0.0.0"
    path = tmp_path / "public.yaml"
    path.write_text(yaml.safe_dump(raw))
    refused = CliRunner().invoke(cli, ["validate", str(path)])
    assert refused.exit_code == 1 and "args.auth configures no API keys" in refused.output
    raw["applications"][0]["args"]["auth"] = {"api_keys_env": "CONDUIT_API_KEYS"}
    path.write_text(yaml.safe_dump(raw))
    assert CliRunner().invoke(cli, ["validate", str(path)]).exit_code == 0


def http_request(path: str, headers: dict, method: str = "POST", root_path: str = ""):
    from starlette.requests import Request

    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": method, "path": root_path + path, "root_path": root_path,
                    "headers": raw, "query_string": b""})


def test_gate_keys_open_paths_and_deadlines():
    from app.api.gate import Gate
    from app.config import parse_app_config

    store = KeyStore([hashlib.sha256(b"good").digest()])

    def gate(**auth):
        config = parse_app_config({"models": [{"name": "m", "source": "x"}], "auth": {"api_keys_env": "K", **auth},
                                   "ingress": {"request_timeout_s": 30}})
        return Gate(config, store, None)

    async def run():
        assert gate().authenticate(http_request("/health", {}, "GET", root_path="/app")) is None  # open
        assert gate().authenticate(http_request("/health", {}, "HEAD")) is None
        for method in ("POST", "PUT", "DELETE"):  # a probe path takes no body, open or not
            with pytest.raises(ConduitError) as e:
                gate().authenticate(http_request("/metrics", {}, method))
            assert e.value.status == 405 and e.value.headers["allow"] == "GET, HEAD"
        with pytest.raises(ConduitError) as e:
            gate(protect_health=True).authenticate(http_request("/health", {}, "GET"))
        assert e.value.status == 401 and e.value.message.startswith("Missing API key")
        with pytest.raises(ConduitError) as e:
            gate().authenticate(http_request("/v1/completions", {"x-api-key": "bad"}))
        assert e.value.status == 401 and e.value.message.startswith("Incorrect API key")
        ok = {"authorization": "Bearer good"}
        key = gate().authenticate(http_request("/v1/completions", ok))
        assert key == hashlib.sha256(b"good").hexdigest()[:12]
        assert (await gate().admit(http_request("/v1/completions", ok), key, now=100))[0].deadline == 130
        shorter = {**ok, "x-request-timeout": "2.5"}
        assert (await gate().admit(http_request("/v1/completions", shorter), key, now=100))[0].deadline == 102.5
        longer = {**ok, "x-request-timeout": "999"}  # a client may ask for less, never more
        assert (await gate().admit(http_request("/v1/completions", longer), key, now=100))[0].deadline == 130
        for bad in ("0", "-1", "nan", "inf", "soon"):
            with pytest.raises(ConduitError) as e:
                await gate().admit(http_request("/v1/completions", {**ok, "x-request-timeout": bad}), key, now=100)
            assert e.value.status == 400 and e.value.param == "x-request-timeout"

    asyncio.run(run())


def test_bounded_maps_deadline_backpressure_and_replica_loss():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from app.api.faults import bounded, bounded_iter
    from app.limits import Call, current_call

    async def slow_items(closed: list):
        try:
            yield 1
            await asyncio.sleep(1)
            yield 2
        finally:
            closed.append(True)  # in the Pipeline: the model stream is cancelled, the engine aborts

    async def run():
        loop = asyncio.get_running_loop()
        current_call.set(Call(deadline=loop.time() + 0.05))
        with pytest.raises(ConduitError) as e:
            async with bounded():
                await asyncio.sleep(1)
        assert e.value.status == 504 and e.value.code == "deadline_exceeded"
        closed, got = [], []
        with pytest.raises(ConduitError):
            async for item in bounded_iter(slow_items(closed)):
                got.append(item)
        assert got == [1] and closed
        current_call.set(Call())
        for error, code in ((BackPressureError(8, 8), "server_overloaded"), (ActorDiedError(), "replica_unavailable")):
            with pytest.raises(ConduitError) as e:
                async with bounded():
                    raise error
            assert e.value.status == 503 and e.value.code == code and e.value.headers["retry-after"] == "1"

    asyncio.run(run())
