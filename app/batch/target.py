"""What `conduit batch` runs, taken from the serve config the online server uses: the model (its
engine settings), the ingress's limits, and one replica's Ray resources and how many replicas."""

from __future__ import annotations

import os
from dataclasses import dataclass

from app.config import ConfigError, IngressConfig, ModelConfig, parse_app_config
from app.resources import ALLOW_PENDING_NODES_ENV, replica_options, uses_gpu


@dataclass
class BatchTarget:
    model: ModelConfig
    ingress: IngressConfig
    deployment: dict  # the model deployment's entry in the config ({} when it has none)

    def actor_options(self, cluster_gpus: float) -> dict:
        """One replica's Ray resources: the deployment's ray_actor_options when the config sets them
        (they replace Conduit's derived ones, as in Serve), else what the Model deployment derives
        (GPUs when the model runs on CUDA), else one CPU."""
        options = self.deployment.get("ray_actor_options")
        if not options:
            derived = replica_options(self.model, uses_gpu(self.model, cluster_gpus))
            options = derived.get("ray_actor_options", {"num_cpus": 1})
        return {k: v for k, v in options.items() if k != "runtime_env"}  # the job runs in the driver's environment

    @property
    def replicas(self) -> int:
        """num_replicas, or the autoscaling maximum: as many replicas as the online app may run."""
        count = self.deployment.get("num_replicas")
        if isinstance(count, int):
            return count
        return int((self.deployment.get("autoscaling_config") or {}).get("max_replicas") or 1)


def fitting_replicas(wanted: int, options: dict, cluster: dict[str, float], spare_cpus: float) -> int:
    """How many of `wanted` actors with `options` the cluster's resources (`ray.cluster_resources()`)
    hold, leaving `spare_cpus` for reading the input: Ray Data would wait forever for the rest. On an
    autoscaling cluster (ALLOW_PENDING_NODES_ENV set) all of them: nodes may still come."""
    if os.environ.get(ALLOW_PENDING_NODES_ENV):
        return wanted
    needs = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    room = {"CPU": cluster.get("CPU", 0) - spare_cpus}
    fits = [int((room.get(name, cluster.get(name, 0)) + 1e-9) // need) for name, need in needs.items() if need > 0]
    return max(0, min([wanted, *fits]))


def find_target(apps: list[dict], model_id: str | None) -> BatchTarget:
    """`apps`: the config's applications (validated, as `conduit validate` does); `model_id`: a
    model's name or alias, or None when the config serves exactly one model."""
    candidates = []
    for app in apps:
        if not app.get("import_path", "").startswith("app.build:"):
            continue
        config = parse_app_config(app.get("args") or {})
        for model in config.models:
            if model_id is None or model_id in (model.name, *model.aliases):
                candidates.append((model, config.ingress, _deployment(app, model)))
    if len(candidates) != 1:
        served = ", ".join(sorted(m.name for a in apps if a.get("import_path", "").startswith("app.build:")
                                  for m in parse_app_config(a.get("args") or {}).models))
        problem = "no model" if not candidates else "more than one model"
        raise ConfigError(f"{problem} matches {model_id or '(no --model)'}; the config serves: {served}")
    model, ingress, deployment = candidates[0]
    if model.engine.tensor_parallel_size > 1:
        raise ConfigError(f"model {model.name!r}: tensor_parallel_size > 1 is not supported by conduit batch yet")
    return BatchTarget(model, ingress, deployment)


def _deployment(app: dict, model: ModelConfig) -> dict:
    return next((d for d in app.get("deployments") or [] if d.get("name") == model.deployment_name), {})
