"""The typed schema of serve_config.yaml's args, and `conduit validate`."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.config import PROJECT_ROOT, ConfigError, parse_app_config

GOOD = {"models": [{"name": "m", "source": "/models/x"}]}


def test_shipped_serve_config_is_valid():
    raw = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    (app,) = raw["applications"]
    config = parse_app_config(app["args"])
    names = {d["name"] for d in app["deployments"]}
    # every deployment override in the file names a deployment the builder really creates
    built = [*config.models, *config.embedding_models]
    assert names == {"Ingress", "Tokenizer", *(m.deployment_name for m in built)}


@pytest.mark.parametrize(
    "args,where",
    [
        ({"models": []}, "args.models"),
        ({"models": [{"name": "m"}]}, "args.models[0].source"),
        ({"models": [{"name": "m", "source": "x", "engine": {"max_num_seqs": 0}}]}, "args.models[0].engine.max_num_seqs"),
        ({"models": [{"name": "m", "source": "x", "engine": {"dtype": "float8"}}]}, "args.models[0].engine.dtype"),
        ({"models": [{"name": "m", "source": "x", "engnie": {}}]}, "args.models[0].engnie"),
        ({**GOOD, "surprise": 1}, "args.surprise"),
    ],
)
def test_bad_field_is_named(args, where):
    with pytest.raises(ConfigError) as e:
        parse_app_config(args)
    assert where in str(e.value)


def test_duplicate_model_ids_are_refused():
    with pytest.raises(ConfigError, match="used twice"):
        parse_app_config({"models": [{"name": "a", "source": "x"}, {"name": "b", "source": "y", "aliases": ["a"]}]})


def test_max_model_len_beyond_model_is_refused():
    engine = parse_app_config({"models": [{"name": "m", "source": "x", "engine": {"max_model_len": 4096}}]}).models[0].engine
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.resolved(1024)


def test_cli_validate(tmp_path):
    conduit = [sys.executable, "-m", "app.cli"]
    ok = subprocess.run([*conduit, "validate", str(PROJECT_ROOT / "serve_config.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    raw = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    raw["applications"][0]["args"]["models"][0]["engine"]["max_num_seqs"] = -3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    res = subprocess.run([*conduit, "validate", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0
    assert "args.models[0].engine.max_num_seqs" in res.stderr


@pytest.mark.parametrize("command", ["validate", "run", "status", "bench", "demo-model"])
def test_cli_help(command):
    conduit = Path(sys.executable).with_name("conduit")  # the command the package installs
    res = subprocess.run([str(conduit), command, "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"conduit {command}" in res.stdout.replace("Usage: ", "usage: ")


def test_cli_bench_passes_its_arguments_on():
    # a server that is not there: app/bench.py's own one-line failure and exit code 2
    res = subprocess.run([sys.executable, "-m", "app.cli", "bench", "--url", "http://127.0.0.1:9", "--model", "m",
                          "--num-requests", "1"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "benchmark of http://127.0.0.1:9 failed" in res.stderr
