"""The Ray resources a model replica needs, derived from its engine config, and the checks that a
node can hold them: statically against serve_config.yaml's deployment options (`conduit
validate`), and against the live cluster's nodes when the app is built with Ray up.

- tensor_parallel_size N > 1: a placement group of N bundles, one per rank (CPU, plus one GPU on
  CUDA), STRICT_PACK so the ranks' collectives stay inside one node. The replica actor sits in
  bundle 0 next to rank 0 and holds no GPU itself; app/engine/tensor_parallel.py puts each rank's
  worker in its bundle.
- device_map: one process holding `num_devices` GPUs (accelerate places the layers over them).
"""

from __future__ import annotations

import os

from app.config import AppConfig, ConfigError, EngineConfig, ModelConfig
from app.engine.scheduler import borrowed_slots

# Autoscaling clusters may start a big enough node only when the placement group asks for it; set
# this to skip the live-node check there (the static checks still run).
ALLOW_PENDING_NODES_ENV = "CONDUIT_ALLOW_PENDING_NODES"
# calls a model replica holds for stream channels: one per ingress replica streaming from it
# (app/api/stream_mux.py); room for 16 ingress replicas
STREAM_CHANNELS = 16


def max_ongoing_requests(engine: EngineConfig) -> int:
    """The calls a model replica must take for its engine's own queue to be the one that fills: the
    running sequences (borrowed slots included), up to twice `max_waiting` waiting, and the stream
    channels. Below that, the excess waits in Serve's queue at the ingress, which is first come,
    first served for every API key, so one key's flood could lock the others out (docs/qos.md)."""
    return engine.max_num_seqs + borrowed_slots(engine.max_num_seqs) + 2 * engine.max_waiting + STREAM_CHANNELS


def uses_gpu(model: ModelConfig, cluster_gpus: float) -> bool:
    return model.engine.device == "cuda" or (model.engine.device == "auto" and cluster_gpus > 0)


def replica_options(model: ModelConfig, gpu: bool) -> dict:
    """Serve deployment options for the model's replica (merged into `Model.options`)."""
    engine = model.engine
    if engine.tensor_parallel_size > 1:
        bundle = {"CPU": engine.num_threads or 1, **({"GPU": 1} if gpu else {})}
        return {
            "placement_group_bundles": [dict(bundle) for _ in range(engine.tensor_parallel_size)],
            "placement_group_strategy": "STRICT_PACK",
        }
    if gpu:
        return {"ray_actor_options": {"num_cpus": 1, "num_gpus": engine.num_devices}}
    return {}


def _field(index: int, model: ModelConfig) -> str:
    name = "tensor_parallel_size" if model.engine.tensor_parallel_size > 1 else "num_devices"
    return f"args.models[{index}].engine.{name}"


def check_deployment_options(config: AppConfig, deployments: list[dict]) -> None:
    """Static: the deployment options in serve_config.yaml (which replace the derived ones) must leave
    room for what the engine config asks: its devices, and the requests it may hold."""
    by_name = {d.get("name"): d for d in deployments}
    problems = []
    for i, model in enumerate(config.models):
        options = by_name.get(model.deployment_name) or {}
        problems += _actor_problems(i, model, options.get("ray_actor_options"))
        needed = max_ongoing_requests(model.engine)
        if options.get("max_ongoing_requests", needed) < needed:
            engine = model.engine
            problems.append(
                f"{model.deployment_name}.max_ongoing_requests: {options['max_ongoing_requests']} is below what "
                f"args.models[{i}].engine may hold, {needed} = max_num_seqs {engine.max_num_seqs} + "
                f"{borrowed_slots(engine.max_num_seqs)} borrowed slots + 2 x max_waiting {engine.max_waiting} + "
                f"{STREAM_CHANNELS} stream channels: past it requests wait in Serve's queue, which is first come, "
                "first served for every API key (docs/qos.md); leave it out to get that value")
    if problems:
        raise ConfigError("invalid Conduit config:\n  " + "\n  ".join(problems))


def _actor_problems(index: int, model: ModelConfig, actor: dict | None) -> list[str]:
    if actor is None:
        return []
    engine, field = model.engine, _field(index, model)
    if engine.tensor_parallel_size > 1:
        problems = []
        if actor.get("num_gpus", 0) > 0:
            problems.append(f"{field}: {model.deployment_name}.ray_actor_options must not ask for "
                            "GPUs: each tensor-parallel rank's worker holds one, in its own bundle")
        if actor.get("num_cpus", 1) > (engine.num_threads or 1):
            problems.append(f"{field}: {model.deployment_name}.ray_actor_options.num_cpus must fit in "
                            f"bundle 0, which has engine.num_threads or 1 = {engine.num_threads or 1} CPU")
        return problems
    if engine.num_devices > 1 and actor.get("num_gpus", 0) < engine.num_devices:
        return [f"{field}: {engine.num_devices} devices need "
                f"{model.deployment_name}.ray_actor_options.num_gpus: {engine.num_devices}"]
    return []


def check_fits_cluster(config: AppConfig, nodes: list[dict], cluster_gpus: float) -> None:
    """Live: every multi-device replica must fit on one of the cluster's alive nodes
    (`nodes` as `ray.nodes()` returns them)."""
    if os.environ.get(ALLOW_PENDING_NODES_ENV):
        return
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    problems = []
    for i, model in enumerate(config.models):
        devices = model.engine.devices_per_replica
        if devices == 1:
            continue
        gpu = uses_gpu(model, cluster_gpus)
        # on CPU each tensor-parallel rank needs its bundle's CPUs on the same node
        kind, need = ("GPU", devices) if gpu else ("CPU", devices * (model.engine.num_threads or 1))
        largest = max((r.get(kind, 0) for r in alive), default=0)
        if need > largest:
            problems.append(f"{_field(i, model)}: one replica needs {need:g} {kind}s on one node, but the largest "
                            f"node has {largest:g} (set {ALLOW_PENDING_NODES_ENV}=1 if an autoscaler adds bigger nodes)")
    if problems:
        raise ConfigError("invalid Conduit config:\n  " + "\n  ".join(problems))


def check_live_cluster(config: AppConfig) -> float:
    """When Ray is up (serve run / serve deploy build the app on the cluster), check every replica
    fits a node; returns the cluster's GPU count (0 when Ray is not up)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    gpus = ray.cluster_resources().get("GPU", 0.0)
    check_fits_cluster(config, ray.nodes(), gpus)
    return gpus
