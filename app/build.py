"""Builds the Ray Serve application from `serve_config.yaml`'s args: what its `import_path` names.

args (validated, see app/config.py) -> Tokenizer + one Model deployment per configured model + one
Embedder per embedding model -> Ingress bound to all of them."""

from __future__ import annotations

from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import LoggingConfig

from app.config import parse_app_config
from app.demo_model import build_demo_model
from app.resources import check_live_cluster, max_ongoing_requests, replica_options, uses_gpu
from deployments.embedder import Embedder
from deployments.ingress import Ingress
from deployments.lora_registry import LoraRegistry
from deployments.model import Model
from deployments.router import PrefixAffinityRouter
from deployments.tokenizer import Tokenizer


def build_app(args: dict) -> Application:
    """serve_config.yaml's import_path: Serve calls it with `args` and requires exactly one parameter
    (Python callers override deployment options on the result, e.g. tests/e2e/variants.with_options)."""
    config = parse_app_config(args)
    cluster_gpus = check_live_cluster(config)
    for model in config.models:
        if model.build_demo_if_missing:
            build_demo_model(model.resolved_source)
    # Serve's own log encoding, so every Conduit deployment's records (access lines too) follow it
    logs = LoggingConfig(encoding=config.logging.format.upper())
    tokenizer = Tokenizer.options(logging_config=logs).bind(config.models)
    models = {
        m.name: Model.options(
            name=m.deployment_name,
            request_router_config=RequestRouterConfig(
                request_router_class=PrefixAffinityRouter,
                # past a full batch a request waits: a replica holding its LoRA adapter is busy then
                request_router_kwargs={"busy_queue_len": m.engine.max_num_seqs},
                # each replica's load per API key (Model.record_routing_stats), for fair share
                request_routing_stats_period_s=1.0),
            max_ongoing_requests=max_ongoing_requests(m.engine),
            logging_config=logs,
            **replica_options(m, uses_gpu(m, cluster_gpus)),
        ).bind(m)
        for m in config.models
    }
    embedders = {
        m.name: Embedder.options(name=m.deployment_name, logging_config=logs).bind(m) for m in config.embedding_models
    }
    # runtime-loaded LoRA adapters (POST /v1/load_lora_adapter), shared by the ingress replicas
    registry = LoraRegistry.options(logging_config=logs).bind() if any(m.lora for m in config.models) else None
    return Ingress.options(logging_config=logs).bind(config, tokenizer, models, embedders=embedders,
                                                     lora_registry=registry)
