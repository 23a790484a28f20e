"""Model replica deployment: loads one model and runs the batching engine on it.

`generate` is a streaming method, one call per engine sequence. Called with a `Route` by an ingress
that has a channel to this replica (`channel`, app/api/stream_mux.py), its deltas go out through that
channel together with the ingress's other streams' (one message per engine step for all of them)
and the call itself yields nothing; otherwise each item is a coalesced delta (`RequestOutput`), at
most one per `engine.stream_interval_s`, so a token does not cost a Ray message of its own."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import ray
from ray import serve

from app.api.errors import ConduitError, model_not_found, unavailable
from app.api.protocol import PreparedRequest
from app.api.stream_mux import ChannelCarried, ChannelOpen, ChannelWanted, Outboxes, Route, pump
from app.config import ModelConfig
from app.engine.async_engine import AsyncEngine, EngineDeadError
from app.engine.engine import LLMEngine, RequestOutput
from app.engine.errors import QueueFull, RequestRejected
from app.engine.guided import CompilerBusy
from app.engine.lora import LoraAdapter
from app.loading import load_replica_model, load_tokenizer, pick_device, resolved_engine_config
from app.metrics import LoadProgress, ModelMetrics
from deployments.lora_cache import AdapterCache, display_name

log = logging.getLogger("ray.serve")
STALL_LIMIT_S = 60.0  # a step that takes longer than this means the engine is stuck


def key_bracket_size(max_num_seqs: int) -> int:
    """Sequences per bracket of a key's load in the routing stats (record_routing_stats)."""
    return max(1, max_num_seqs // 8)


@serve.deployment(
    name="Model",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
class Model:
    def __init__(self, config: ModelConfig):
        import torch

        replica = serve.get_replica_context().replica_id.unique_id
        progress = LoadProgress(config.name, replica, ["config", "tokenizer", "weights", "engine"])
        progress.stage("config")
        engine_config = resolved_engine_config(config)
        device = pick_device(engine_config)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(engine_config.num_threads or max(1, int(cpus)))
        progress.stage("tokenizer")
        tokenizer = load_tokenizer(config)
        progress.stage("weights")
        # runner: None, or the tensor-parallel workers when engine.tensor_parallel_size > 1
        model, runner = load_replica_model(config.model_copy(update={"engine": engine_config}), device)
        progress.stage("engine")  # the KV cache is allocated here
        self.config = engine_config
        self.engine = AsyncEngine(LLMEngine(model, tokenizer, engine_config, runner=runner, lora=config.lora))
        self.adapters = AdapterCache(config.lora, model) if config.lora else None  # LoRA adapters, read on first use
        self.metrics = ModelMetrics(config.name, replica, engine_config.block_size)
        self.metrics.poll(self.engine.engine.stats,  # engine gauges, once a second
                          self.engine.engine.lora_stats if config.lora else None)
        self.outboxes = Outboxes(replica)  # the ingress replicas' stream channels to this one
        progress.finished()
        log.info("model %s ready: %s", config.name, engine_config.model_dump())

    async def generate(self, request: PreparedRequest, route: Route | None = None) -> AsyncIterator:
        try:  # the key's share of the queue, then the replica's; held until the engine has the request
            admitted = self.engine.admit(request.tenant)
        except QueueFull as e:
            raise unavailable(str(e), "server_overloaded") from None
        try:
            lora = await self._adapter(request)
            outbox = self.outboxes.get(route.ingress) if route else None
            if outbox is not None:  # its deltas go with the ingress's other streams', each engine step
                self.outboxes.carried += 1
                yield ChannelCarried()
                await pump(outbox, route.key, self._deltas(request, lora, 0.0, None, admitted))
                return
            if route is not None:
                yield ChannelWanted(self.outboxes.replica)
            deltas = self._deltas(request, lora, self.config.stream_interval_s,
                                  self.config.max_stream_messages_per_s, admitted)
            try:
                async for out in deltas:
                    yield out
            finally:  # cancelled at the `yield`: abort the sequence now (see _deltas)
                await deltas.aclose()
        finally:  # never reached the engine (a bad adapter, a client gone before its first delta)
            admitted()

    async def channel(self, request: ChannelOpen) -> AsyncIterator:
        """An ingress replica's stream channel to this replica (app/api/stream_mux.py)."""
        async for item in self.outboxes.serve(request):
            yield item

    async def _adapter(self, request: PreparedRequest) -> LoraAdapter | None:
        """The request's LoRA adapter (read from its files on first use), or None for the base model."""
        if request.lora is None:
            return None
        if self.adapters is None:
            raise model_not_found(display_name(request.lora))
        adapter = await self.adapters.get(request.lora, request.lora_path)
        self.adapters.requests[request.lora] += 1
        return adapter

    async def load_lora(self, key: str, path: str) -> None:
        """Reads and checks adapter `key` now (POST /v1/load_lora_adapter), so that a bad one is refused
        there; it stays cached here like one read on first use."""
        if self.adapters is None:
            raise model_not_found(display_name(key))
        await self.adapters.get(key, path)

    async def lora_stats(self) -> dict:
        """This replica's adapters: the engine's slots and counts, and requests served per adapter key."""
        return {"replica": self.outboxes.replica, **self.engine.engine.lora_stats(),
                "requests": dict(self.adapters.requests) if self.adapters else {}}

    async def _deltas(self, request: PreparedRequest, lora: LoraAdapter | None, interval_s: float,
                      max_messages_per_s: float | None, admitted) -> AsyncIterator[RequestOutput]:
        """The request's deltas; the engine's errors as the API's (RequestRejected -> 400, ...)."""
        deltas = self.engine.generate(request.request_id, request.prompt_ids, request.sampling, interval_s,
                                      max_messages_per_s, request.priority, request.tenant, lora, admitted)
        tracked = self.metrics.track(request.request_id, deltas)
        try:
            async for out in tracked:
                yield out
        except RequestRejected as e:  # e.g. it can never fit in the KV cache
            raise ConduitError(e.message, 400, param=e.param) from None
        except EngineDeadError:
            raise
        except CompilerBusy as e:  # every guided-decoding compile worker stayed busy
            raise unavailable(str(e), "guided_compile_busy") from None
        except Exception as e:  # this request's sequence failed in the engine; the others run on
            raise request_failed(request.request_id, e) from None
        finally:
            # A cancelled call (its client went away) gets a CancelledError at an `await` above, which
            # leaves both streams suspended: closing them aborts the sequence now, before the engine's
            # next step, rather than whenever the generators are collected.
            await tracked.aclose()
            await deltas.aclose()

    def record_routing_stats(self) -> dict:
        """For the router (Serve pulls it every request_routing_stats_period_s): each API key's
        sequences here, running and waiting, in brackets of an eighth of a batch, for the keys with one
        or more: each key's load spreads over the replicas, so each replica shares its slots by weight
        among the same keys. Brackets, not counts: Serve broadcasts every change to every router, so
        the stats change only when a key's load moves by a bracket (at most once a pull)."""
        by_key = dict(self.engine.engine.scheduler.tenant_work)  # a copy: the engine thread changes it
        bracket = key_bracket_size(self.config.max_num_seqs)
        return {"key_brackets": {tenant: n // bracket for tenant, n in by_key.items() if tenant and n >= bracket}}

    async def stats(self) -> dict:
        return vars(self.engine.engine.stats())

    async def stream_channels(self) -> dict:
        """This replica's stream channels: open now, opened and streams carried so far."""
        return self.outboxes.stats()

    async def check_health(self) -> None:
        self.engine.check_health(STALL_LIMIT_S)


def request_failed(request_id: str, error: Exception) -> ConduitError:
    import torch

    log.warning("request %s failed in the engine: %r", request_id, error)
    if isinstance(error, torch.OutOfMemoryError):
        return ConduitError("This request needs more memory than the model replica has free; ask for fewer "
                            "tokens or no prompt log-probs.", 400, code="out_of_memory")
    return ConduitError(f"Generation failed for this request: {error}", 500, "server_error", code="generation_failed")
