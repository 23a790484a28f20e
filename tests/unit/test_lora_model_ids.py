"""Which base model and LoRA adapter a model id names (app/api/lora_table.py, ModelTable.target), and
which paths a runtime load may read. No Ray: the table's configured and dynamic_path adapters."""

import asyncio

import pytest

from app.api.errors import ConduitError
from app.api.lora_table import LoraTable, Target, allowed_path, runtime_name
from app.api.model_table import ModelTable
from app.config import LoraConfig


def table(tmp_path) -> ModelTable:
    lora = LoraTable({
        "base": LoraConfig(adapters={"sql": "/adapters/sql"}, dynamic_path=str(tmp_path)),
        "other": LoraConfig(adapters={"chat": "/adapters/chat"}),
    })
    return ModelTable({"base": ["b"], "other": [], "plain": []}, {}, lora=lora)


def target(models: ModelTable, model: str) -> Target:
    return asyncio.run(models.target(model))


def test_base_ids_adapter_forms_and_dynamic_names(tmp_path):
    models = table(tmp_path)
    assert target(models, "b") == Target("base")
    assert target(models, "sql") == Target("base", "sql", "/adapters/sql")  # vLLM's form
    assert target(models, "base:sql") == Target("base", "sql", "/adapters/sql")  # Ray Serve LLM's form
    assert target(models, "b:sql") == Target("base", "sql", "/adapters/sql")  # through an alias
    assert target(models, "other:chat") == Target("other", "chat", "/adapters/chat")
    # not configured: under the dynamic_path (the replica finds out whether the files are there)
    assert target(models, "base:new") == Target("base", "new", f"{tmp_path}/new")
    assert target(models, "new") == Target("base", "new", f"{tmp_path}/new")


@pytest.mark.parametrize("model", ["other:sql", "other:new", "plain:sql", "base:..", "..", "base:a/b", "nope:sql"])
def test_what_names_no_adapter_is_a_404_naming_the_id(tmp_path, model):
    with pytest.raises(ConduitError) as err:
        target(table(tmp_path), model)
    assert (err.value.status, err.value.param, err.value.code) == (404, "model", "model_not_found")
    assert f"`{model}`" in err.value.message


def test_runtime_loads_read_only_under_dynamic_path(tmp_path):
    config = LoraConfig(dynamic_path=str(tmp_path))
    (tmp_path / "a").mkdir()
    assert allowed_path(config, str(tmp_path / "a")) == str(tmp_path / "a")
    outside = tmp_path.parent / "elsewhere"
    (tmp_path / "link").symlink_to(tmp_path.parent)
    for path in [str(outside), f"{tmp_path}/../elsewhere", str(tmp_path), str(tmp_path / "link" / "x"), "/etc"]:
        with pytest.raises(ConduitError) as err:
            allowed_path(config, path)
        assert (err.value.status, err.value.param) == (400, "lora_path"), path
    with pytest.raises(ConduitError, match="dynamic_path is not set"):
        allowed_path(LoraConfig(), "/x")
    url = LoraConfig(dynamic_path="s3://bucket/loras/")
    assert allowed_path(url, "s3://bucket/loras/a") == "s3://bucket/loras/a"
    for path in ["s3://bucket/other/a", "s3://bucket/loras/../x", "s3://bucket/loras"]:
        with pytest.raises(ConduitError):
            allowed_path(url, path)


def test_runtime_names(tmp_path):
    models = table(tmp_path)
    assert runtime_name(models, "base:new") == ("base", "new")
    assert runtime_name(models, "b:new") == ("base", "new")
    for name, message in [("new", "Several models"), ("plain:new", "serves no LoRA"), ("base:sql", "already"),
                          ("base:plain", "already"), ("base:.x", "letters"), ("base:a/b", "letters")]:
        with pytest.raises(ConduitError, match=message) as err:
            runtime_name(models, name)
        assert (err.value.status, err.value.param) == (400, "lora_name")
