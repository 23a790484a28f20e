"""What a key's refusal costs: nothing from the shared counter until its window resets; replicas'
limiters over one counter, as in test_limits.py, without Ray."""

import asyncio

import pytest

from app.api.errors import ConduitError
from tests.unit.test_limits import Clock, admitted, limiters

WINDOW_START = 60 * 100


async def background() -> None:
    """Let the limiters' background syncs run."""
    for _ in range(20):
        await asyncio.sleep(0)


async def refused(call) -> ConduitError:
    with pytest.raises(ConduitError) as e:
        await call
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
    return e.value


def test_a_refused_key_is_refused_locally_until_its_window_resets():
    clock = Clock(WINDOW_START + 5)

    async def run():
        (a, b), calls = limiters(2, clock, requests_per_minute=4)
        assert [await admitted((a, b)[i % 2], "k") for i in range(4)] == [True] * 4
        await background()
        before = len(calls)
        assert not any([await admitted(r, "k") for r in (a, b) for _ in range(20)])
        assert len(calls) - before <= 2, "each replica asks the counter at most once, then refuses by itself"
        after_refusals = len(calls)
        clock.now = WINDOW_START + 35
        e = await refused(a.admit("k"))
        assert e.headers["retry-after"] == "25" and e.headers["x-ratelimit-reset-requests"] == "25s"
        clock.now = WINDOW_START + 60
        assert await admitted(a, "k"), "a new window"
        assert len(calls) == after_refusals + 1

    asyncio.run(run())
