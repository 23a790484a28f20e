"""The router: which replica of a model deployment a request goes to (which deployment is the model
table's answer, app/api/model_table.py).

Neither decision is a Ray hop. The model table is a dict in the ingress, and the replica choice is
a Ray Serve `RequestRouter` that runs inside the caller's handle: the ingress asks it once per
request, and the token stream then flows straight from the chosen replica to the ingress.

Replica choice is prefix-affine: replicas are ranked by rendezvous hash of the prompt's first KV
block, and the two best-ranked compete on queue length (power of two choices). Requests sharing a
system prompt therefore land where that prefix is already cached, without piling onto one replica.
Fair share across replicas: an API key's request goes only to replicas where that key holds least,
in brackets of an eighth of a batch (each replica reports its load per key through Serve's routing
stats, about once a second); within the same bracket prefix affinity decides.
A request for a LoRA adapter goes first to replicas that hold it (Serve's model multiplexing tells
the router which), with the prefix order as tie-breaker, and to a less busy replica, which then loads
it, when every holder is busy.
"""

from __future__ import annotations

import hashlib
import random
import time

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from app import metrics
from app.api.protocol import PreparedRequest
from app.api.stream_mux import ChannelOpen

PREFIX_TOKENS = 16  # = the engine's default block size: one cached block's worth


def _score(replica_id: str, key: bytes) -> bytes:
    return hashlib.blake2b(key + replica_id.encode(), digest_size=8).digest()


class PrefixAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, busy_queue_len: int = 32) -> None:
        """`busy_queue_len`: a replica with this many requests is busy (RequestRouterConfig's
        request_router_kwargs: the model's batch size, past which a request waits for a slot)."""
        self.busy_queue_len = busy_queue_len

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        started = time.perf_counter()
        request = pending_request.args[0] if pending_request and pending_request.args else None
        if isinstance(request, ChannelOpen):  # an ingress's stream channel goes to the replica it names
            named = [r for r in candidate_replicas if r.replica_id.unique_id == request.replica]
            return [named or candidate_replicas]
        tenant = request.tenant if isinstance(request, PreparedRequest) else ""
        if isinstance(request, PreparedRequest):
            key = repr(request.prompt_ids[:PREFIX_TOKENS]).encode()
            ranked = sorted(candidate_replicas, key=lambda r: (self._key_bracket(r, tenant),
                                                                _score(r.replica_id.unique_id, key)))
        else:
            ranked = random.sample(candidate_replicas, len(candidate_replicas))
        if isinstance(request, PreparedRequest) and request.lora is not None:
            ranks = self._adapter_ranks(ranked, request.lora)
        else:
            ranks = self._prefix_ranks(ranked, tenant)
        metrics.deferred.observe("conduit:router_latency_seconds", time.perf_counter() - started,
                                 deployment=self._deployment_id.name)
        return ranks

    def _prefix_ranks(self, ranked: list[RunningReplica], tenant: str) -> list[list[RunningReplica]]:
        """The best two compete on queue length, the rest are the fallback when both are full; but only
        replicas in the key's least-loaded bracket compete, so a key's load spreads over the replicas
        even where queue lengths alone are even (two replicas: one full of A, the other of B)."""
        least = self._key_bracket(ranked[0], tenant)
        best = [r for r in ranked[:2] if self._key_bracket(r, tenant) == least]
        rest = [r for r in ranked if r not in best]
        return [best, rest] if rest else [best]

    def _adapter_ranks(self, ranked: list[RunningReplica], lora: str) -> list[list[RunningReplica]]:
        """Replicas holding the adapter (Serve's multiplexed model ids: loaded or loading) first, the
        best two by prefix competing on queue length; when every holder is busy, the least busy of the
        replicas holding fewest adapters loads it; busy holders are the last resort."""
        holders = [r for r in ranked if lora in r.multiplexed_model_ids]
        free_holders = [r for r in holders if not self._busy(r)]
        others = sorted((r for r in ranked if lora not in r.multiplexed_model_ids),
                        key=lambda r: len(r.multiplexed_model_ids))  # stable: prefix order among equals
        ranks = [free_holders[:2], others, [r for r in holders if r not in free_holders[:2]]]
        return [rank for rank in ranks if rank]

    @staticmethod
    def _key_bracket(replica: RunningReplica, tenant: str) -> int:
        """The key's load on `replica` as last reported (Model.record_routing_stats), in brackets of
        an eighth of a batch: small differences leave the prefix order alone. (A server without keys
        has one tenant, "anonymous": there this spreads only a load that is out of balance.)"""
        return replica.routing_stats.get("key_brackets", {}).get(tenant, 0) if tenant else 0

    def _busy(self, replica: RunningReplica) -> bool:
        queued = self.replica_queue_len_cache.get(replica.replica_id)
        return queued is not None and queued >= self.busy_queue_len
