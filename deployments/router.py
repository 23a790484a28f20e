"""The router: which model deployment a request goes to, and which replica of it.

Neither decision is a Ray hop. The model table is a dict in the ingress, and the replica choice is
a Ray Serve `RequestRouter` that runs inside the caller's handle: the ingress asks it once per
request, and the token stream then flows straight from the chosen replica to the ingress.

Replica choice is prefix-affine: replicas are ranked by rendezvous hash of the prompt's first KV
block, and the two best-ranked compete on queue length (power of two choices). Requests sharing a
system prompt therefore land where that prefix is already cached, without piling onto one replica.
"""

from __future__ import annotations

import hashlib
import random
import time

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from app.api.errors import model_not_found
from app import metrics
from app.api.protocol import PreparedRequest
from app.api.stream_mux import ChannelOpen

PREFIX_TOKENS = 16  # = the engine's default block size: one cached block's worth


class ModelTable:
    """Maps every served id (name or alias) to its model deployment's handle."""

    def __init__(self, names: dict[str, list[str]], handles: dict):
        self.handles = handles
        self.ids = {alias: name for name, aliases in names.items() for alias in [name, *aliases]}

    def resolve(self, model: str) -> str:
        name = self.ids.get(model)
        if name is None:
            raise model_not_found(model)
        return name

    def handle(self, name: str):
        return self.handles[name]


def _score(replica_id: str, key: bytes) -> bytes:
    return hashlib.blake2b(key + replica_id.encode(), digest_size=8).digest()


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
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
        if isinstance(request, PreparedRequest):
            key = repr(request.prompt_ids[:PREFIX_TOKENS]).encode()
            ranked = sorted(candidate_replicas, key=lambda r: _score(r.replica_id.unique_id, key))
        else:
            ranked = random.sample(candidate_replicas, len(candidate_replicas))
        metrics.observe("conduit:router_latency_seconds", time.perf_counter() - started,
                        deployment=self._deployment_id.name)
        # best two compete on queue length; the rest are the fallback when both are full
        return [ranked[:2], ranked[2:]] if len(ranked) > 2 else [ranked]
