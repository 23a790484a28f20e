"""Model table and the prefix-affine replica choice (the Ray Serve RequestRouter), without a cluster."""

import asyncio
from types import SimpleNamespace

import pytest

from app.api.errors import ConduitError
from app.api.model_table import ModelTable
from app.api.protocol import PreparedRequest
from deployments.router import PrefixAffinityRouter


def test_model_table_resolves_names_and_aliases():
    table = ModelTable({"a": ["alias-a"], "b": []}, {"a": "handle-a", "b": "handle-b"})
    assert table.resolve("alias-a") == "a" and table.handle(table.resolve("b")) == "handle-b"
    with pytest.raises(ConduitError) as e:
        table.resolve("c")
    assert e.value.status == 404 and e.value.param == "model"


def choose(prompt_ids, replicas):
    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # choose_replicas needs only its deployment id
    router._deployment_id = SimpleNamespace(name="Model-m")
    pending = SimpleNamespace(args=[PreparedRequest("r", "m", prompt_ids)])
    return asyncio.run(router.choose_replicas(replicas, pending))


def test_same_prefix_same_replicas_and_spread_otherwise():
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=f"r{i}"), routing_stats={}) for i in range(6)]
    system = list(range(100, 116))
    first = choose(system + [1, 2, 3], replicas)
    assert len(first[0]) == 2 and len(first[1]) == 4  # two compete on load, the rest are fallback
    again = choose(system + [9, 9], list(reversed(replicas)))
    assert {r.replica_id.unique_id for r in again[0]} == {r.replica_id.unique_id for r in first[0]}
    preferred = {choose([p, p + 1] * 8, replicas)[0][0].replica_id.unique_id for p in range(200)}
    assert len(preferred) == 6  # different prefixes use every replica


def test_a_keys_request_goes_where_that_key_holds_fewest_sequences():
    """Fair share across replicas: replicas report each key's load in brackets of an eighth of a batch."""
    def replica(name, brackets):
        return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name), routing_stats={"key_brackets": brackets})

    def first_choices(tenant, replicas):
        router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)
        router._deployment_id = SimpleNamespace(name="Model-m")
        picks = set()
        for p in range(50):  # many prefixes: without the key's load, each replica would lead for some
            pending = SimpleNamespace(args=[PreparedRequest("r", "m", [p, p + 1] * 8, tenant=tenant)])
            picks |= {r.replica_id.unique_id for r in asyncio.run(router.choose_replicas(replicas, pending))[0]}
        return picks

    replicas = [replica("flooded", {"a": 3}), replica("some", {"a": 1}), replica("free", {}), replica("free2", {})]
    assert first_choices("a", replicas) == {"free", "free2"}  # the two where "a" holds least compete on load
    assert first_choices("b", replicas) == {"flooded", "some", "free", "free2"}  # "b" has no load: prefix only
    assert first_choices("", replicas) == {"flooded", "some", "free", "free2"}  # no tenant (internal calls)


def test_with_two_replicas_only_the_one_where_the_key_holds_less_competes():
    """Two replicas both compete on queue length, which alone would let one fill with key "a" and the
    other with "b" (even queues, and no fair share within either); the key's load decides first."""
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id="a-heavy"), routing_stats={"key_brackets": {"a": 2}}),
                SimpleNamespace(replica_id=SimpleNamespace(unique_id="b-heavy"), routing_stats={"key_brackets": {"b": 2}})]
    for p in range(20):
        pending = SimpleNamespace(args=[PreparedRequest("r", "m", [p, p + 1] * 8, tenant="a")])
        router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)
        router._deployment_id = SimpleNamespace(name="Model-m")
        first, fallback = asyncio.run(router.choose_replicas(replicas, pending))
        assert [r.replica_id.unique_id for r in first] == ["b-heavy"]
        assert [r.replica_id.unique_id for r in fallback] == ["a-heavy"]  # when that one is full
    assert all(len(rank[0]) == 2 for rank in [choose([p] * 16, replicas) for p in range(20)])  # no tenant: both
