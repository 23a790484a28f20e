"""A model replica's LoRA adapters, read from their files on first use (CPU tensors), at most
`max_adapters_per_replica` of them, the least recently used dropped first.

Serve's model multiplexing (`serve.multiplexed`) keeps the cache: it also tells the routers which
adapters this replica holds (or is loading), which deployments/router.py prefers. Each adapter is
keyed by its PreparedRequest.lora (the multiplexed model id the ingress sent it with). The engine
installs a cached adapter into one of its slots when a sequence using it is scheduled."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from contextvars import ContextVar

from ray import serve

from app.api.errors import ConduitError, invalid, model_not_found
from app.config import LoraConfig
from app.engine.lora import LoraAdapter, LoraError, load_adapter

log = logging.getLogger("ray.serve")
_path: ContextVar[str] = ContextVar("lora_path")  # the files of the adapter the calling request asks for


class AdapterCache:
    def __init__(self, config: LoraConfig, model):
        """`model`: the replica's torch model, which every adapter is checked against."""

        async def read_adapter(key: str) -> LoraAdapter:
            # off the event loop: reading and checking the files must not stall the other streams
            return await asyncio.to_thread(load_adapter, key, _path.get(), model, config.max_rank)

        # built per replica: the size is this model's, and the decorator keeps its cache on the function
        self._cached = serve.multiplexed(max_num_models_per_replica=config.max_adapters_per_replica)(read_adapter)
        self.requests: Counter[str] = Counter()  # requests served per adapter key on this replica

    async def get(self, key: str, path: str) -> LoraAdapter:
        """The adapter `key` (its files at `path`), read now unless cached; its errors as the API's."""
        _path.set(path)
        try:
            return await self._cached(key)
        except LoraError as e:
            raise api_error(key, e) from None


def display_name(key: str) -> str:
    """The name a client knows the adapter by (runtime loads' keys carry `#generation`)."""
    return key.partition("#")[0]


def api_error(key: str, error: LoraError) -> ConduitError:
    """Files gone: 404 like an unknown model; files that are no LoRA adapter of this base: 400."""
    name = display_name(key)
    if error.kind == "not_found":  # the detail (where it looked) is for the log, not the client
        log.info("LoRA adapter %s not found: %s", key, error.message)
        return model_not_found(name)
    return invalid(f"LoRA adapter `{name}` cannot be served: {error.message}", error.param or "model",
                   "invalid_lora_adapter")
