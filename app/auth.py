"""API keys. The config names where keys live (`auth.api_keys_env`: an environment variable of
comma-separated keys; `auth.api_keys_file`: a file of sha256 hex digests, one a line) and never holds
a key. Only digests are kept in memory and compared; a key is known in logs and rate limits by its
`key_id`, a short prefix of its digest, never by itself."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

from app.api.errors import ConduitError
from app.config import PROJECT_ROOT, AuthConfig, ConfigError

KEY_HEADERS = ("authorization", "x-api-key", "api-key")  # OpenAI / Anthropic / Azure clients
HEALTH_PATH, METRICS_PATH = "/health", "/metrics"


def health_paths() -> frozenset[str]:
    """The liveness routes: /health, and Vertex AI's probe route where AIP_HEALTH_ROUTE names another
    (app/api/wire/vertex.py serves it there; Vertex sets the variable in the container)."""
    return frozenset({HEALTH_PATH, os.environ.get("AIP_HEALTH_ROUTE") or HEALTH_PATH})


def probe_paths() -> frozenset[str]:
    """The paths probes and scrapers call: GET/HEAD only."""
    return health_paths() | {METRICS_PATH}


def open_paths(auth: AuthConfig) -> frozenset[str]:
    """The probe paths served without a key when keys are configured: the health paths unless
    auth.protect_health; /metrics only with auth.open_metrics."""
    return ((frozenset() if auth.protect_health else health_paths())
            | (frozenset({METRICS_PATH}) if auth.open_metrics else frozenset()))


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key_digest: bytes) -> str:
    return key_digest.hex()[:12]


class KeyStore:
    def __init__(self, digests: list[bytes]):
        self.digests = digests

    @classmethod
    def from_config(cls, auth: AuthConfig) -> KeyStore:
        digests = []
        if auth.api_keys_env:
            keys = [k.strip() for k in os.environ.get(auth.api_keys_env, "").split(",") if k.strip()]
            if not keys:
                raise ConfigError(f"args.auth.api_keys_env: environment variable {auth.api_keys_env} is unset or empty")
            digests += [digest(k) for k in keys]
        if auth.api_keys_file:
            digests += _read_digests(auth.api_keys_file)
        return cls(digests)

    def identify(self, presented: str | None) -> str | None:
        """The presented key's id if it is one of ours, else None. Every stored digest is compared
        in constant time, whichever matches, so timing tells nothing about the keys."""
        if not presented:
            return None
        wanted = digest(presented)
        match = None
        for stored in self.digests:
            if hmac.compare_digest(wanted, stored):
                match = stored
        return None if match is None else key_id(match)


def _read_digests(path: str) -> list[bytes]:
    file = Path(path) if Path(path).is_absolute() else PROJECT_ROOT / path
    try:
        lines = file.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"args.auth.api_keys_file: cannot read {file}: {e.strerror}") from None
    digests = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            value = bytes.fromhex(line)
        except ValueError:
            value = b""
        if len(value) != 32:  # the line is not echoed: it might be a key pasted by mistake
            raise ConfigError(f"args.auth.api_keys_file: line {number} of {file} is not a sha256 hex digest")
        digests.append(value)
    if not digests:
        raise ConfigError(f"args.auth.api_keys_file: {file} holds no key digests")
    return digests


def presented_key(headers) -> str | None:
    """The key from `Authorization: Bearer`, `x-api-key` or `api-key`, the first one present."""
    for name in KEY_HEADERS:
        value = headers.get(name)
        if not value:
            continue
        if name == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer":
                continue
            value = token
        return value.strip()
    return None


def missing_or_wrong(presented: str | None) -> ConduitError:
    problem = "Incorrect API key provided." if presented else "Missing API key."
    return ConduitError(
        f"{problem} Send it as `Authorization: Bearer KEY`, `x-api-key: KEY` or `api-key: KEY`.",
        401, "authentication_error", None, "invalid_api_key",
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_host(host_header: str | None) -> bool:
    """Whether a Host header names this machine by a loopback name or address, with any port. A
    keyless server accepts only these: a web page whose domain an attacker re-points at 127.0.0.1
    (DNS rebinding) sends its own name as Host."""
    try:
        return is_loopback(urlsplit(f"//{host_header}").hostname or "")
    except ValueError:  # not a host at all (e.g. an unclosed "[")
        return False


def check_exposure(auth: AuthConfig, host: str) -> None:
    """Without API keys Conduit serves loopback only, unless the config says a gateway in front
    authenticates (`auth.allow_unauthenticated`)."""
    if not auth.enabled and not auth.allow_unauthenticated and not is_loopback(host):
        raise ConfigError(
            f"http_options.host is {host!r} but args.auth configures no API keys: anyone who can reach the "
            "port could use the model. Set auth.api_keys_env or auth.api_keys_file, bind to 127.0.0.1, or "
            "set auth.allow_unauthenticated: true when a gateway in front authenticates."
        )


def proxy_host() -> str:
    """The host Serve's HTTP proxies bind (`http_options.host`), as the Serve controller has it."""
    import ray
    from ray.serve.context import _get_global_client

    return ray.get(_get_global_client()._controller.get_http_config.remote(), timeout=30).host


def unmatched_policies(auth: AuthConfig, store: KeyStore) -> list[str]:
    """The auth.keys policies' key ids that name none of the configured keys (a typo, a retired key)."""
    ids = {key_id(d) for d in store.digests}
    return [policy.key_id for policy in auth.keys if policy.key_id not in ids]


def describe(auth: AuthConfig, store: KeyStore) -> str:
    """The start-up line: what protects this server (never a key or its digest)."""
    if not auth.enabled:
        extra = " (auth.allow_unauthenticated: a gateway in front must authenticate)" if auth.allow_unauthenticated else ""
        return f"auth OFF: no API keys configured; serving loopback only{extra}"
    sources = [f"env {auth.api_keys_env}" if auth.api_keys_env else "", auth.api_keys_file or ""]
    open_without_key = ", ".join(sorted(open_paths(auth))) or "none"
    return (f"auth ON: {len(store.digests)} API key(s) from {', '.join(s for s in sources if s)}; "
            f"open without a key: {open_without_key}")
