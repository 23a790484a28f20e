"""Which model a `conduit batch` job runs when the config also serves embedding models (issue 18):
--model, else the model the input's first line names, else the only text-generation model; an
embedding model's actors get the Embedder deployment's options."""

import json

import pytest
import yaml

from app.batch.target import find_target, first_line_model
from app.config import PROJECT_ROOT

EMBEDDER = "all-minilm-l6-v2"  # serve_config.yaml's embedding model


@pytest.fixture
def apps() -> list[dict]:
    return yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())["applications"]


def test_an_embedding_model_by_name(apps):
    target = find_target(apps, EMBEDDER)
    assert target.embeds and target.model.name == EMBEDDER
    assert target.actor_options(1) == {"num_cpus": 0.25}  # serve_config.yaml's Embedder entry
    apps[0]["deployments"] = []
    assert find_target(apps, EMBEDDER).actor_options(1) == {"num_cpus": 0.25}  # the deployment's own default
    assert find_target(apps, EMBEDDER).replicas == 1


def test_the_first_line_names_the_model_when_no_model_is_given(apps):
    assert find_target(apps, None, EMBEDDER).embeds
    assert not find_target(apps, None, "conduit-demo").embeds
    # a model the config does not serve: the only text-generation model (that line gets its 404)
    assert find_target(apps, None, "gpt-9").model.name == "conduit-demo"
    assert find_target(apps, "conduit-demo", EMBEDDER).model.name == "conduit-demo"  # --model decides


def test_first_line_model(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n\n" + json.dumps({"custom_id": "a", "body": {"model": "m"}}) + "\n{}\n")
    assert first_line_model(str(path)) == "m"  # blank lines skipped
    for first in ["not json", json.dumps({"body": {"model": 3}}), json.dumps([1])]:
        path.write_text(first + "\n")
        assert first_line_model(str(path)) is None
    assert first_line_model(str(tmp_path / "missing.jsonl")) is None
    assert first_line_model("s3://bucket/in.jsonl") is None
