"""The replica router with LoRA adapters (deployments/router.py), without a cluster: holders of the
adapter first, prefix order among them; a less busy replica when every holder is busy."""

import asyncio
from types import SimpleNamespace

from app.api.protocol import PreparedRequest
from deployments.router import PrefixAffinityRouter


def router(queue_lens: dict[str, int], busy: int = 4) -> PrefixAffinityRouter:
    chosen = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # choose_replicas needs only these
    chosen._deployment_id = SimpleNamespace(name="Model-m")
    chosen._replica_queue_len_cache = SimpleNamespace(get=lambda replica_id: queue_lens.get(replica_id.unique_id))
    chosen.initialize_state(busy_queue_len=busy)
    return chosen


def replica(name: str, adapters: set[str]) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name), multiplexed_model_ids=adapters, routing_stats={})


def ranks(chosen: PrefixAffinityRouter, replicas, lora: str | None, prompt=(1, 2, 3)) -> list[list[str]]:
    pending = SimpleNamespace(args=[PreparedRequest("r", "m", list(prompt), lora=lora)])
    return [[r.replica_id.unique_id for r in rank] for rank in asyncio.run(chosen.choose_replicas(replicas, pending))]


def test_holders_first_then_replicas_with_fewest_adapters():
    replicas = [replica("a", {"x", "y"}), replica("b", {"y"}), replica("c", set()), replica("d", {"x"})]
    first, others, *_ = ranks(router({}), replicas, "x")
    assert sorted(first) == ["a", "d"]
    assert others == ["c", "b"]  # fewest adapters first: c holds none
    # the prefix orders the holders: the same prompt prefers the same holder
    assert {ranks(router({}), list(reversed(replicas)), "x")[0][0] for _ in range(3)} == {first[0]}


def test_every_holder_busy_sends_it_to_a_less_busy_replica():
    replicas = [replica("a", {"x"}), replica("b", set())]
    assert ranks(router({"a": 3, "b": 0}), replicas, "x") == [["a"], ["b"]]
    assert ranks(router({"a": 4, "b": 0}), replicas, "x") == [["b"], ["a"]]  # busy holder: last resort


def test_unknown_adapter_goes_where_fewest_adapters_are_and_base_requests_are_unchanged():
    replicas = [replica("a", {"y", "z"}), replica("b", {"y"})]
    assert ranks(router({}), replicas, "x") == [["b", "a"]]
    assert sorted(ranks(router({}), replicas, None)[0]) == ["a", "b"]
