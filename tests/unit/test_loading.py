"""`source:` is a path or a Hugging Face id by app.loading.model_source's rule; a path missing on the
node that loads the model is an error naming the model and the directory, never a Hub download."""

from pathlib import Path

import pytest

from app.config import PROJECT_ROOT, ConfigError, EmbeddingModelConfig, ModelConfig
from app.loading import load_tokenizer, model_source, resolved_engine_config


def model(source: str, **extra) -> ModelConfig:
    return ModelConfig(name="my-model", source=source, **extra)


@pytest.mark.parametrize("source, looked_for", [
    ("./models/x", PROJECT_ROOT / "models" / "x"),
    ("../elsewhere/x", PROJECT_ROOT.parent / "elsewhere" / "x"),
    (".cache/no-such-model", PROJECT_ROOT / ".cache" / "no-such-model"),
    ("/no/such/model", Path("/no/such/model")),
    ("tests/no-such-model", PROJECT_ROOT / "tests" / "no-such-model"),  # tests/ is in the checkout
    ("models/x/y", PROJECT_ROOT / "models" / "x" / "y"),  # no Hub id has two slashes
])
def test_missing_path_is_an_error_naming_model_and_directory(source, looked_for):
    with pytest.raises(ConfigError) as raised:
        model_source(model(source))
    message = str(raised.value)
    assert "'my-model'" in message and repr(source) in message and f"{looked_for} is not a directory" in message


def test_the_loaders_refuse_it_before_any_download():
    for load in (load_tokenizer, resolved_engine_config):
        with pytest.raises(ConfigError, match="is not a directory on this node"):
            load(model("./models/x"))
    with pytest.raises(ConfigError, match="'my-embedder'"):
        load_tokenizer(EmbeddingModelConfig(name="my-embedder", source="tests/no-such-model"))


def test_home_relative_path_is_refused_not_fetched():
    with pytest.raises(ConfigError, match="write the absolute path"):
        model_source(model("~/models/x"))


def test_demo_model_missing_on_this_node_says_where_it_is_built():
    with pytest.raises(ConfigError, match="conduit demo-model"):
        model_source(model(".cache/no-such-model", build_demo_if_missing=True))


@pytest.mark.parametrize("hub_id", ["org/name", "gpt2", "sentence-transformers/all-MiniLM-L6-v2"])
def test_hub_ids_stay_hub_ids(hub_id):
    assert model_source(model(hub_id)) == hub_id


def test_existing_directories_are_paths(model_path):
    assert model_source(model(model_path)) == model_path  # absolute
    assert model_source(model(".cache/demo-model")) == str(PROJECT_ROOT / ".cache" / "demo-model")
    assert model_source(model("tests/unit")) == str(PROJECT_ROOT / "tests" / "unit")  # bare, in the checkout
    assert load_tokenizer(model(".cache/demo-model")) is not None
