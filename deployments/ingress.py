"""Ingress deployment: the one HTTP entry. Its FastAPI app (app/api/server.py) mounts one adapter
per wire format; every adapter drives the same `Pipeline` (app/api/pipeline.py).

Path of one request: proxy -> Ingress (this) -> Tokenizer.prepare (one hop) -> Model.generate
(one call, replica picked by deployments/router.py inside this process) -> deltas back, together with
the other streams that replica serves to this ingress (app/api/stream_mux.py)."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from app.api.disconnects import CancelOnDisconnect
from app.api.lora_table import LoraTable
from app.api.model_table import ModelTable
from app.api.pipeline import Pipeline
from app.api.server import build_api
from app.api.stream_mux import StreamMux
from app.auth import proxy_host
from app.config import AppConfig


# graceful_shutdown_timeout_s: a replaced ingress must outwait the streams it carries, which the model
# replicas may take their own graceful_shutdown_timeout_s (30 s) to finish; Ray's default, 20 s, cut
# them mid-body on a redeploy
@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=512,
                  graceful_shutdown_timeout_s=45)
@serve.ingress()
class Ingress:
    def __init__(self, config: AppConfig, tokenizer: DeploymentHandle, models: dict[str, DeploymentHandle],
                 embedders: dict[str, DeploymentHandle] | None = None, lora_registry: DeploymentHandle | None = None):
        self.config = config
        adapters = {m.name: m.lora for m in config.models if m.lora is not None}  # models that serve LoRA adapters
        self.pipeline = Pipeline(
            tokenizer,
            ModelTable({m.name: m.aliases for m in config.models}, models,
                       lora=LoraTable(adapters, lora_registry) if adapters else None),
            embedders=ModelTable({m.name: m.aliases for m in config.embedding_models}, embedders or {}),
            limits=config.ingress.input_limits,
            mux=StreamMux(serve.get_replica_context().replica_id.unique_id),
        )

    def __serve_build_asgi_app__(self):
        """Called by Serve after __init__: the app's routes close over this replica's pipeline."""
        # Serve has no public getter for a replica's own deployment options
        max_ongoing = serve.get_replica_context()._deployment_config.max_ongoing_requests
        api = build_api(self.pipeline, self.config, proxy_host(), max_ongoing)
        api.add_middleware(CancelOnDisconnect)  # outermost: a client that goes away frees its engine sequences
        return api
