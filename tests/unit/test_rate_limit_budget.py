"""What a key's refusal costs (nothing from the shared counter until its window resets), tokens
reserved before generating and settled after, and calls that count as several requests; replicas'
limiters over one counter, as in test_limits.py, without Ray."""

import asyncio

import pytest

from app.api.errors import ConduitError
from app.limits import Budget, Call
from tests.unit.test_limits import Clock, admitted, http_request, limiters

WINDOW_START = 60 * 100


async def background() -> None:
    """Let the limiters' background syncs run (their waits advance the fake clock)."""
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


def test_a_reservation_that_does_not_fit_is_refused_and_settling_returns_the_rest():
    clock = Clock(WINDOW_START + 5)

    async def run():
        (a,), calls = limiters(1, clock, tokens_per_minute=1000)
        first = await a.reserve("k", 600, used=100)  # prompt 100, max_tokens 500
        before = len(calls)
        e = await refused(a.reserve("k", 500, used=50))
        assert e.type == "tokens" and "may use 500 tokens" in e.message and "400 are left" in e.message
        assert int(e.headers["retry-after"]) == 55 and e.headers["x-ratelimit-remaining-tokens"] == "400"
        assert len(calls) == before, "refused from a fresh view, without asking the counter"
        first.use(40)  # generated 40 of its 500
        first.settle()
        first.settle()  # once only
        assert a.headers(a.keys["k"])["x-ratelimit-remaining-tokens"] == str(1000 - 140)
        second = await a.reserve("k", 500, used=50)
        assert a.headers(a.keys["k"])["x-ratelimit-remaining-tokens"] == str(1000 - 140 - 500)
        second.settle()  # generated nothing: only its prompt is charged
        second.use(7)  # a choice that ended after the call settled is still charged
        await background()
        assert a.headers(a.keys["k"])["x-ratelimit-remaining-tokens"] == str(1000 - 140 - 50 - 7)

    asyncio.run(run())


def test_too_large_a_reservation_is_refused_outright():
    async def run():
        (a,), calls = limiters(1, Clock(), tokens_per_minute=1000)
        e = await refused(a.reserve("k", 16 * 100, used=100))
        assert "may use 1600 tokens" in e.message and "fewer max_tokens" in e.message and not calls

    asyncio.run(run())


def test_tokens_given_back_reach_another_replica():
    clock = Clock(WINDOW_START + 5)

    async def run():
        (a, b), calls = limiters(2, clock, tokens_per_minute=1000)
        held = await a.reserve("k", 950, used=50)
        await refused(b.reserve("k", 200, used=10))  # the cluster has 30 left
        held.use(100)
        held.settle()  # 800 unused: near the limit a hands its idle lease back to the counter
        await background()
        assert a.keys["k"].leased_tokens == 0
        before = len(calls)
        await refused(b.reserve("k", 200, used=10))  # b's refusal holds while its view is fresh
        assert len(calls) == before
        clock.now += 0.6
        await b.reserve("k", 200, used=10)
        assert b.headers(b.keys["k"])["x-ratelimit-remaining-tokens"] == str(1000 - 150 - 200)

    asyncio.run(run())


def test_far_from_the_limit_reservations_do_not_wait_for_the_counter():
    clock = Clock(WINDOW_START + 5)

    async def run():
        (a,), calls = limiters(1, clock, tokens_per_minute=1_000_000, requests_per_minute=10_000)
        for _ in range(200):
            await a.admit("k")
            reservation = await a.reserve("k", 1000, used=100)
            reservation.use(50)
            reservation.settle()
            await asyncio.sleep(0)
        return len(calls)

    assert asyncio.run(run()) <= 6


def test_a_call_that_counts_as_several_requests_takes_them_all_or_none():
    clock = Clock(WINDOW_START + 5)

    async def run():
        (a,), _ = limiters(1, clock, requests_per_minute=10)
        await a.admit("k")
        budget = Budget(a, "k")
        await budget.take_requests(5)
        e = await refused(budget.take_requests(5))  # 4 left
        assert "5 more needed" in e.message and e.headers["x-ratelimit-remaining-requests"] == "4"
        await budget.take_requests(4)
        assert not await admitted(a, "k")

    asyncio.run(run())


def test_admission_hands_the_key_budget_to_the_call():
    from app.api.gate import Gate
    from app.config import parse_app_config

    async def run():
        (a,), _ = limiters(1, Clock(), tokens_per_minute=100)
        assert Call().budget.limiter is None  # no limits where nothing was admitted
        config = parse_app_config({"models": [{"name": "m", "source": "x"}]})
        call, _ = await Gate(config, None, a).admit(http_request("/v1/completions", {}), "k", now=100)
        assert (call.budget.limiter, call.budget.key) == (a, "k")
        await refused(call.budget.reserve(101, used=1))

    asyncio.run(run())


def test_without_limits_reservations_hold_nothing():
    async def run():
        reservation = await Budget().reserve(10**9, used=5)
        await Budget().take_requests(10**6)
        reservation.settle()
        (requests_only,), calls = limiters(1, Clock(), requests_per_minute=5)
        assert (await requests_only.reserve("k", 10**9, used=5)).held == 0 and not calls

    asyncio.run(run())
