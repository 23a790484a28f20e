"""What `conduit batch` runs, taken from the serve config the online server uses: the model (its
engine settings; or an embedding model), the ingress's limits, and one replica's Ray resources and
how many replicas. One job runs one model: `--model`, else the one the input's first line names,
else the config's only text-generation model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from app.batch.source import is_parquet, split_lines
from app.config import ConfigError, EmbeddingModelConfig, IngressConfig, ModelConfig, parse_app_config
from app.resources import ALLOW_PENDING_NODES_ENV, replica_options, uses_gpu


@dataclass
class BatchTarget:
    model: ModelConfig | EmbeddingModelConfig
    ingress: IngressConfig
    deployment: dict  # the model's deployment entry in the config ({} when it has none)

    @property
    def embeds(self) -> bool:
        return isinstance(self.model, EmbeddingModelConfig)

    def actor_options(self, cluster_gpus: float) -> dict:
        """One replica's Ray resources: the deployment's ray_actor_options when the config sets them
        (they replace Conduit's derived ones, as in Serve), else what the Model deployment derives
        (GPUs when the model runs on CUDA), else one CPU; for an embedding model, the Embedder
        deployment's own."""
        options = self.deployment.get("ray_actor_options")
        if not options and self.embeds:
            from deployments.embedder import Embedder

            options = Embedder.ray_actor_options
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


def find_target(apps: list[dict], model_id: str | None, line_model: str | None = None) -> BatchTarget:
    """`apps`: the config's applications (validated, as `conduit validate` does); `model_id`: a
    model's name or alias (`--model`), or None: then the model `line_model` (the input's first line's)
    names when the config serves it, else the config's only text-generation model."""
    served = [(model, config.ingress, _deployment(app, model)) for app in apps
              if app.get("import_path", "").startswith("app.build:")
              for config in [parse_app_config(app.get("args") or {})]
              for model in [*config.models, *config.embedding_models]]
    if model_id is not None:
        candidates = [c for c in served if model_id in _ids(c[0])]
    else:
        candidates = ([c for c in served if line_model in _ids(c[0])]
                      or [c for c in served if isinstance(c[0], ModelConfig)])
    if len(candidates) != 1:
        names = ", ".join(sorted(model.name for model, _, _ in served))
        problem = "no model" if not candidates else "more than one model"
        raise ConfigError(f"{problem} matches {model_id or '(no --model)'}; the config serves: {names}")
    model, ingress, deployment = candidates[0]
    if isinstance(model, ModelConfig) and model.engine.tensor_parallel_size > 1:
        raise ConfigError(f"model {model.name!r}: tensor_parallel_size > 1 is not supported by conduit batch yet")
    return BatchTarget(model, ingress, deployment)


def first_line_model(path: str) -> str | None:
    """The `model` the first non-blank line of a local JSONL input names, if it names one."""
    if "://" in path or is_parquet(path):
        return None
    try:
        with open(path, "rb") as f:
            raw = next((raw for raw in split_lines(f) if raw.strip()), b"")
        model = json.loads(raw)["body"]["model"]
    except (OSError, ValueError, TypeError, KeyError):  # no such file (the job says so), or no model named
        return None
    return model if isinstance(model, str) else None


def _ids(model: ModelConfig | EmbeddingModelConfig) -> tuple[str, ...]:
    return (model.name, *model.aliases)


def _deployment(app: dict, model: ModelConfig | EmbeddingModelConfig) -> dict:
    return next((d for d in app.get("deployments") or [] if d.get("name") == model.deployment_name), {})
