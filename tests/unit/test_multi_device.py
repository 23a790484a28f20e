"""Replicas that span devices: resources derived from the engine config, the checks that a node
can hold them (static in `conduit validate`, live against Ray's nodes), and device_map loading."""

import pytest
import yaml
from typer.testing import CliRunner

from app.cli import cli
from app.config import PROJECT_ROOT, ConfigError, ModelConfig, parse_app_config
from app.engine.engine import LLMEngine
from app.engine.sampling_params import SamplingParams
from app.loading import load_model, load_tokenizer, resolved_engine_config
from app.resources import check_deployment_options, check_fits_cluster, replica_options


def app_config(**engine):
    return parse_app_config({"models": [{"name": "m", "source": "/models/x", "engine": engine}]})


def node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def test_tensor_parallel_gets_one_bundle_per_rank():
    (model,) = app_config(tensor_parallel_size=4).models
    gpu = replica_options(model, gpu=True)
    assert gpu == {"placement_group_bundles": [{"CPU": 1, "GPU": 1}] * 4, "placement_group_strategy": "STRICT_PACK"}
    assert replica_options(model, gpu=False)["placement_group_bundles"] == [{"CPU": 1}] * 4


def test_device_map_replica_holds_its_gpus():
    (model,) = app_config(device_map="auto", num_devices=2).models
    assert replica_options(model, gpu=True) == {"ray_actor_options": {"num_cpus": 1, "num_gpus": 2}}
    (single,) = app_config().models
    assert replica_options(single, gpu=False) == {}


@pytest.mark.parametrize(
    "engine,message",
    [
        ({"tensor_parallel_size": 2, "device_map": "auto"}, "exclusive"),
        ({"device_map": {"model.layers.0": 0, "model.layers.1": 1}}, "names 2 GPUs but num_devices is 1"),
        ({"tensor_parallel_size": 0}, "args.models[0].engine.tensor_parallel_size"),
    ],
)
def test_inconsistent_device_config_is_refused(engine, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        app_config(**engine)


def test_more_gpus_than_any_node_has_fails_with_the_field_named():
    config = app_config(tensor_parallel_size=4, device="cuda")
    with pytest.raises(ConfigError) as e:
        check_fits_cluster(config, [node(16, 2), node(16, 2), node(8, 8, alive=False)], cluster_gpus=4)
    assert "args.models[0].engine.tensor_parallel_size" in str(e.value)
    assert "needs 4 GPUs on one node, but the largest node has 2" in str(e.value)
    check_fits_cluster(config, [node(16, 2), node(16, 4)], cluster_gpus=6)  # one node is big enough


def test_cpu_tensor_parallel_counts_cpus_per_node():
    config = app_config(tensor_parallel_size=2, num_threads=2)
    with pytest.raises(ConfigError, match="needs 4 CPUs on one node, but the largest node has 3"):
        check_fits_cluster(config, [node(3), node(3)], cluster_gpus=0)


def test_pending_nodes_switch_skips_the_live_check(monkeypatch):
    monkeypatch.setenv("CONDUIT_ALLOW_PENDING_NODES", "1")
    check_fits_cluster(app_config(tensor_parallel_size=8, device="cuda"), [node(8, 1)], cluster_gpus=1)


def test_deployment_options_must_leave_room_for_the_ranks():
    config = app_config(tensor_parallel_size=2)
    gpu_replica = [{"name": "Model-m", "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}]
    with pytest.raises(ConfigError, match="must not ask for GPUs"):
        check_deployment_options(config, gpu_replica)
    with pytest.raises(ConfigError, match="num_gpus: 2"):
        check_deployment_options(app_config(device_map="auto", num_devices=2), [{"name": "Model-m", "ray_actor_options": {}}])
    check_deployment_options(config, [{"name": "Model-m", "ray_actor_options": {"num_cpus": 1}}])


def test_conduit_validate_reports_a_replica_that_cannot_hold_its_ranks(tmp_path):
    raw = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    app = raw["applications"][0]
    app["args"]["models"][0]["engine"]["tensor_parallel_size"] = 2
    model_deployment = next(d for d in app["deployments"] if d["name"].startswith("Model-"))
    model_deployment["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1}
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 1
    assert "args.models[0].engine.tensor_parallel_size" in result.output and "must not ask for GPUs" in result.output


def test_device_map_loading_keeps_greedy_output(model_path, reference_greedy):
    """The device_map loading path. On this CPU-only machine "auto" maps every layer to the CPU, so
    this checks the path, not sharding itself (bench/gpu_check.py does that on GPUs)."""
    config = ModelConfig(name="dm", source=model_path, engine={"device_map": "auto", "max_model_len": 256})
    config = config.model_copy(update={"engine": resolved_engine_config(config)})
    model = load_model(config, "cpu")
    assert model.device.type == "cpu"
    engine = LLMEngine(model, load_tokenizer(config), config.engine)
    prompt = list(range(10, 30))
    engine.add_request("a", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    tokens = []
    while engine.has_work():
        tokens += [t for out in engine.step() for t in out.token_ids]
    assert tokens == reference_greedy(prompt, 12)
