"""Which paths the Gate serves without a key: /health and Vertex's configured health route (unless
auth.protect_health), /metrics only with auth.open_metrics, GET/HEAD only; and the Host names a
keyless server answers to."""

import hashlib

import pytest

from app.api.errors import ConduitError
from app.api.gate import Gate
from app.auth import KeyStore
from app.config import parse_app_config
from tests.unit.test_limits import http_request

VERTEX_HEALTH = "/v1/projects/p/locations/l/endpoints/e/health"


def keyed_gate(**auth) -> Gate:
    config = parse_app_config({"models": [{"name": "m", "source": "x"}], "auth": {"api_keys_env": "K", **auth}})
    return Gate(config, KeyStore([hashlib.sha256(b"good").digest()]), None)


def test_vertex_health_route_is_a_health_path(monkeypatch):
    monkeypatch.setenv("AIP_HEALTH_ROUTE", VERTEX_HEALTH)
    gate = keyed_gate()
    assert gate.authenticate(http_request(VERTEX_HEALTH, {}, "GET", root_path="/app")) is None
    with pytest.raises(ConduitError) as e:
        gate.authenticate(http_request(VERTEX_HEALTH, {}, "POST"))
    assert e.value.status == 405
    with pytest.raises(ConduitError) as e:
        keyed_gate(protect_health=True).authenticate(http_request(VERTEX_HEALTH, {}, "GET"))
    assert e.value.status == 401
    monkeypatch.delenv("AIP_HEALTH_ROUTE")
    with pytest.raises(ConduitError) as e:  # not a probe path where Vertex's route is not configured
        keyed_gate().authenticate(http_request(VERTEX_HEALTH, {}, "GET"))
    assert e.value.status == 401


def test_keyless_gate_answers_loopback_hosts_only():
    def gate(**auth) -> Gate:
        return Gate(parse_app_config({"models": [{"name": "m", "source": "x"}], "auth": auth}), None, None)

    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:8000", "[::1]:8000", "[::1]", "127.0.0.2"):
        assert gate().authenticate(http_request("/v1/completions", {"host": host})) == "anonymous", host
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", "0.0.0.0",
                 "[::1", ""):
        for path in ("/v1/completions", "/health"):
            with pytest.raises(ConduitError) as e:
                gate().authenticate(http_request(path, {"host": host}))
            assert e.value.status == 421 and e.value.code == "misdirected_request", host
    with pytest.raises(ConduitError):
        gate().authenticate(http_request("/health", {}))  # no Host at all
    # behind a gateway that authenticates (allow_unauthenticated), or with keys: any name
    assert gate(allow_unauthenticated=True).authenticate(http_request("/v1/completions", {"host": "a.example"}))
    assert keyed_gate().authenticate(http_request("/v1/completions", {"host": "a.example", "x-api-key": "good"}))


def test_metrics_needs_a_key_unless_opened():
    metrics, health = http_request("/metrics", {}, "GET"), http_request("/health", {}, "GET")
    with pytest.raises(ConduitError) as e:
        keyed_gate().authenticate(metrics)
    assert e.value.status == 401
    assert keyed_gate().authenticate(health) is None
    assert keyed_gate().authenticate(http_request("/metrics", {"authorization": "Bearer good"}, "GET"))
    assert keyed_gate(open_metrics=True).authenticate(metrics) is None
    opened_but_health_protected = keyed_gate(open_metrics=True, protect_health=True)
    assert opened_but_health_protected.authenticate(metrics) is None
    with pytest.raises(ConduitError):
        opened_but_health_protected.authenticate(health)
