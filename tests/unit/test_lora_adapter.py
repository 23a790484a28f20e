"""Adapters that cannot be served: each is refused with a LoraError of the right kind and a clear
message, and the engine goes on serving. Plus the lora config block's own checks."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from app.config import ConfigError, EngineConfig, parse_app_config
from app.engine.errors import RequestRejected
from app.engine.lora import LoraError, load_adapter
from tests.unit.lora_adapters import fresh_model, make_adapter
from tests.unit.test_engine import greedy, make_engine, prompts, run_all
from tests.unit.test_lora_engine import lora_engine


@pytest.fixture(scope="module")
def base(model_path):
    return fresh_model(model_path)


@pytest.fixture(scope="module")
def good(base, tmp_path_factory):
    return make_adapter(base, tmp_path_factory.mktemp("good") / "qv8", 11, r=8, lora_alpha=16,
                        target_modules=["q_proj", "v_proj"])


def copy_of(adapter_dir, tmp_path, name="bad"):
    return shutil.copytree(adapter_dir, tmp_path / name)


def refused(path, model, kind, *words, max_rank=16):
    with pytest.raises(LoraError) as caught:
        load_adapter("bad", str(path), model, max_rank)
    assert caught.value.kind == kind, caught.value
    assert caught.value.param == "model"
    for word in words:
        assert word in str(caught.value), str(caught.value)
    return caught.value


def test_missing_directory_and_files(base, good, tmp_path):
    refused(tmp_path / "nowhere", base, "not_found", "no directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, base, "not_found", "adapter_config.json")
    weightless = copy_of(good, tmp_path)
    (weightless / "adapter_model.safetensors").unlink()
    refused(weightless, base, "not_found", "weights")


def test_corrupt_config(base, good, tmp_path):
    bad = copy_of(good, tmp_path)
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    refused(bad, base, "invalid", "adapter_config.json")


def test_rank_over_max_rank(base, good):
    refused(good, base, "invalid", "rank 8", "max_rank 4", max_rank=4)


def test_target_module_the_model_lacks(base, good, tmp_path):
    bad = copy_of(good, tmp_path)
    weights = load_file(bad / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "qkv_proj"): v for k, v in weights.items()}, bad / "adapter_model.safetensors")
    refused(bad, base, "invalid", "qkv_proj", "does not have")


def test_adapter_of_another_base(base, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=3000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4))
    path = make_adapter(other, tmp_path / "other", 0, r=4, lora_alpha=8, target_modules=["q_proj"])
    refused(path, base, "invalid", "another base model")


def test_not_lora(base, tmp_path):
    import peft

    ia3 = peft.get_peft_model(fresh_model(base.name_or_path), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                             feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    refused(tmp_path / "ia3", base, "invalid", "not LoRA")


def test_fsspec_url(base, good):
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in good.iterdir():
        fs.pipe(f"/adapters/qv8/{f.name}", f.read_bytes())
    adapter = load_adapter("qv8", "memory://adapters/qv8", base, 16)
    local = load_adapter("qv8", str(good), base, 16)
    assert adapter.rank == 8 and adapter.modules.keys() == local.modules.keys()
    assert all(adapter.modules[m].a.equal(local.modules[m].a) for m in local.modules)
    refused("memory://adapters/none", base, "not_found", "no directory")


def test_engine_keeps_serving_after_refusals(model_path, hf_model, good, tmp_path, reference_greedy):
    engine = lora_engine(model_path)
    bad = copy_of(good, tmp_path)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": "x"}))
    for path in (bad, tmp_path / "nowhere"):
        with pytest.raises(LoraError):
            load_adapter("bad", str(path), engine.model, 16)
    adapter = load_adapter("qv8", str(good), engine.model, 16)
    p = prompts(hf_model[1], 1, seed=12)[0]
    engine.add_request("base", p, greedy(8))
    engine.add_request("lora", p, greedy(8), lora=adapter)
    outputs = run_all(engine)
    assert outputs["base"] == reference_greedy(p, 8)
    assert len(outputs["lora"]) == 8 and outputs["lora"] != outputs["base"]


def test_engine_without_lora_refuses_an_adapter(hf_model, good, base):
    engine = make_engine(hf_model)
    with pytest.raises(RequestRejected) as caught:
        engine.add_request("x", [1, 2, 3], greedy(4), lora=load_adapter("qv8", str(good), base, 16))
    assert caught.value.param == "model" and "no LoRA" in str(caught.value)


def test_adapter_over_the_engines_max_rank_is_refused(model_path, good, base):
    engine = lora_engine(model_path)
    engine.loras.max_rank = 4  # an adapter loaded for a larger max_rank than this engine's slots
    with pytest.raises(RequestRejected, match="rank 8"):
        engine.add_request("x", [1, 2, 3], greedy(4), lora=load_adapter("qv8", str(good), base, 16))


@pytest.mark.parametrize("lora, engine, words", [
    ({"adapters": {"a/b": "/x"}}, {}, ["lora.adapters", "no ':' or '/'"]),
    ({"adapters": {"m:x": "/x"}}, {}, ["lora.adapters"]),
    ({"adapters": {"m": "/x"}}, {}, ["models[0].lora.adapters.m", "already a model id"]),
    ({"max_rank": 0}, {}, ["lora.max_rank"]),
    ({"max_adapters_per_replica": 0}, {}, ["lora.max_adapters_per_replica"]),
    ({"adapter": {}}, {}, ["lora.adapter"]),
    ({}, {"tensor_parallel_size": 2}, ["lora is not supported with engine.tensor_parallel_size"]),
])
def test_lora_config_names_the_bad_field(lora, engine, words):
    with pytest.raises(ConfigError) as caught:
        parse_app_config({"models": [{"name": "m", "source": "x", "engine": engine, "lora": lora}]})
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_lora_config_defaults():
    model = parse_app_config({"models": [{"name": "m", "source": "x", "lora": {"adapters": {"a": "/x"}}}]}).models[0]
    assert (model.lora.max_adapters_per_replica, model.lora.max_rank, model.lora.dynamic_path) == (4, 16, None)
    assert EngineConfig() == model.engine  # the engine config is unchanged: LLMEngine takes the lora block
