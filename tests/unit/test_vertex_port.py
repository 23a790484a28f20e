"""`conduit run` on Vertex AI: AIP_HTTP_PORT decides the port and opens the host."""

import pytest
import yaml

from app.cli import _load_apps, with_vertex_port
from app.config import PROJECT_ROOT, ConfigError

CONFIG = PROJECT_ROOT / "serve_config.yaml"


def test_unset_keeps_the_config(monkeypatch):
    monkeypatch.delenv("AIP_HTTP_PORT", raising=False)
    assert with_vertex_port(CONFIG) == CONFIG


def test_port_and_host_from_vertex(monkeypatch):
    monkeypatch.setenv("AIP_HTTP_PORT", "8080")
    derived = yaml.safe_load(with_vertex_port(CONFIG).read_text())
    original = yaml.safe_load(CONFIG.read_text())
    assert derived["http_options"] == {**original["http_options"], "host": "0.0.0.0", "port": 8080}
    assert derived["applications"] == original["applications"]


def test_open_host_still_needs_keys_or_a_gateway(monkeypatch, tmp_path):
    """Vertex authenticates in front of the container: the config says so (auth.allow_unauthenticated)."""
    monkeypatch.setenv("AIP_HTTP_PORT", "8080")
    raw = yaml.safe_load(CONFIG.read_text())
    raw["applications"][0]["args"].pop("auth", None)
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="0.0.0.0"):
        _load_apps(with_vertex_port(config))
    raw["applications"][0]["args"]["auth"] = {"allow_unauthenticated": True}
    config.write_text(yaml.safe_dump(raw))
    assert len(_load_apps(with_vertex_port(config))) == len(raw["applications"])


def test_bad_port(monkeypatch):
    monkeypatch.setenv("AIP_HTTP_PORT", "eighty")
    with pytest.raises(ValueError, match="AIP_HTTP_PORT"):
        with_vertex_port(CONFIG)
