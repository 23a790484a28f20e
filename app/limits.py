"""Per-key rate limits that hold for the whole cluster, and the per-call context (deadline, token
meter, token budget) that the admission middleware hands to the `Pipeline`.

The counts live in one named, detached Ray actor (`WindowCounts`): requests and tokens per key in
the current one-minute window. An ingress replica does not ask it on every request: it leases
request units and tokens in batches, and reports tokens in the background. It waits for the actor
only when its lease cannot cover a request (the first request of a key in a window, or near the
limit, where leases shrink to what one request needs so the limit stays exact across replicas).

Tokens are reserved before a call generates (prompt + n × max_tokens, from the replica's token
lease) and settled when it ends: what it did not generate goes back to the lease. Far from the
limit a replica keeps up to three batches (a batch: 1/50 of the limit) of idle lease for its next
calls and hands the rest back within `TOKEN_SYNC_S`; near the limit it hands all of it back, so
other replicas can lease it. A reservation larger than the idle lease waits for the actor. A key refused for requests stays refused in the
replica until the window resets (the count only grows); refused for tokens, until its view of the
count is `TOKEN_SYNC_S` old (calls in flight give tokens back), with no actor call in between."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

from app.api.errors import ConduitError, unavailable
from app.config import RateLimitConfig
from app.qos import PriorityClass, capped, class_of

log = logging.getLogger("ray.serve")
WINDOW_S = 60
TOKEN_SYNC_S = 0.5  # how stale a replica's view of a key's cluster-wide token count may get


def _no_charge(tokens: int) -> None:
    pass


@dataclass
class Reservation:
    """Tokens held for one call before it generates; `settle` gives back what it did not use."""

    held: int = 0
    used: int = 0
    give_back: Callable[[int], None] = _no_charge
    charge: Callable[[int], None] = _no_charge  # for tokens used after settling
    settled: bool = False

    def use(self, tokens: int) -> None:
        if self.settled:
            self.charge(tokens)
        else:
            self.used += tokens

    def settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        unused = self.held - self.used
        if unused > 0:
            self.give_back(unused)
        elif unused < 0:
            self.charge(-unused)


@dataclass
class Budget:
    """One admitted key's limits, for what a call draws beyond its admission: more request units (a
    Vertex predict call's instances) and tokens reserved before generating. No limiter: no limits."""

    limiter: RateLimiter | None = None
    key: str = ""

    async def take_requests(self, count: int) -> None:
        if self.limiter is not None and count > 0:
            await self.limiter.take_requests(self.key, count)

    async def reserve(self, tokens: int, used: int) -> Reservation:
        """Hold `tokens` (429 when they do not fit), of which `used` are spent already (the prompt)."""
        if self.limiter is None:
            return Reservation(used=used)
        return await self.limiter.reserve(self.key, tokens, used)


@dataclass
class Call:
    """What the admission middleware decided for one HTTP call; read by the Pipeline."""

    deadline: float | None = None  # event-loop time by which the answer must be complete
    charge: Callable[[int], None] = _no_charge  # tokens used after the fact (embeddings), for tokens-per-minute
    budget: Budget = field(default_factory=Budget)
    tenant: str = ""  # the admitted key's id: whose share of the engine its sequences use
    max_class: PriorityClass = "interactive"  # the best class its key may ask for (auth.keys); default: no cap
    ran_class: PriorityClass | None = None  # the class its sequences were sent at, for the response's header

    def scheduling(self, asked_priority: int) -> tuple[int, str]:
        """The priority the engine runs this call at (the asked one, capped by the key's class), and its tenant."""
        priority = capped(asked_priority, self.max_class)
        self.ran_class = class_of(priority)
        return priority, self.tenant


current_call: ContextVar[Call] = ContextVar("conduit_call", default=Call())


@dataclass
class Ask:
    """What one replica asks of the counter for one key."""

    requests: int = 0  # request units needed: all of them or none
    extra_requests: int = 0  # more units, as many as fit
    tokens: int = 0  # tokens needed: all of them or none
    extra_tokens: int = 0  # more tokens, as many as fit
    report: int = 0  # tokens charged (+) or handed back (-) in this replica since its last ask


@dataclass
class Grant:
    requests: int  # request units leased by this ask
    tokens: int  # tokens leased by this ask
    used_requests: int  # cluster-wide in this window, every lease included
    used_tokens: int
    reset_in_s: float
    window: int


def fit(need: int, extra: int, limit: int | None, used: int) -> int:
    """`need` and as much of `extra` as fit under `limit`; nothing when `need` does not fit."""
    room = math.inf if limit is None else limit - used
    return 0 if need > room else need + int(min(extra, room - need))


class WindowCounts:
    """The cluster's usage per key in the current one-minute window (wall-clock aligned)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.window = -1
        self.used: dict[str, list[int]] = {}  # key id -> [requests, tokens]

    def take(self, key: str, ask: Ask, rpm: int | None, tpm: int | None) -> Grant:
        now = self.clock()
        window = int(now // WINDOW_S)
        if window != self.window:
            self.window, self.used = window, {}
        used = self.used.setdefault(key, [0, 0])
        used[1] += ask.report
        requests = fit(ask.requests, ask.extra_requests, rpm, used[0])
        tokens = fit(ask.tokens, ask.extra_tokens, tpm, used[1])
        used[0] += requests
        used[1] += tokens
        return Grant(requests, tokens, used[0], used[1], (window + 1) * WINDOW_S - now, window)


def counter_actor():
    """The cluster's one `WindowCounts` for this application, created by the first ingress replica."""
    import ray
    from ray import serve

    app_name = serve.get_replica_context().app_name
    actor = ray.remote(num_cpus=0, max_restarts=-1)(WindowCounts)
    # v2: `take`'s arguments changed; a detached actor of the former code may still run in the cluster
    return actor.options(
        name=f"conduit-rate-limits-v2-{app_name}", namespace="conduit", lifetime="detached", get_if_exists=True
    ).remote()


@dataclass
class KeyView:
    """One replica's view of one key in the current window."""

    leased_requests: int = 0  # request units this replica may still admit without asking
    leased_tokens: int = 0  # tokens this replica may still reserve without asking
    used_requests: int = 0  # cluster-wide (every replica's leases included), as of the last answer
    used_tokens: int = 0
    unreported: int = 0  # tokens charged (+) or handed back (-) here since the last answer
    window: int | None = None  # the counter's window number, once it answered in this one
    resets_at: float = 0.0  # monotonic time the window ends
    last_sync: float = -math.inf
    syncing: asyncio.Task | None = field(default=None, repr=False)


def batch_size(limit: int | None) -> int:
    return max(1, (limit or 0) // 50)


class RateLimiter:
    def __init__(self, limits: RateLimitConfig, take: Callable[[str, Ask, int | None, int | None], Awaitable[Grant]],
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Awaitable] = asyncio.sleep):
        self.rpm, self.tpm = limits.requests_per_minute, limits.tokens_per_minute
        self.take, self.clock, self.sleep = take, clock, sleep
        self.request_batch, self.token_batch = batch_size(self.rpm), batch_size(self.tpm)
        self.keys: dict[str, KeyView] = {}

    async def admit(self, key: str) -> dict[str, str]:
        """Count one request for `key`: its rate-limit headers, or a 429 when it is over a limit."""
        view = self._view(key)
        if self.tpm:
            await self._check_tokens_left(key, view)
        if self.rpm:
            await self._take_requests(key, view, 1)
        self._sync_in_background(key, view, by_call=True)
        return self.headers(view)

    async def take_requests(self, key: str, count: int) -> None:
        """Count `count` more requests for `key`, all or none (429)."""
        if self.rpm:
            await self._take_requests(key, self._view(key), count)
            self._sync_in_background(key, self._view(key), by_call=True)

    async def reserve(self, key: str, tokens: int, used: int) -> Reservation:
        """Hold `tokens` of the key's tokens per minute until the call settles; a 429 when they do not fit."""
        if not self.tpm:
            return Reservation(used=used)
        view = self._view(key)
        if tokens > self.tpm:
            raise self._tokens_refused(view, tokens)
        from_lease = min(view.leased_tokens, tokens)
        view.leased_tokens -= from_lease
        leased = False
        try:
            leased = tokens == from_lease or await self._lease_tokens(key, view, tokens - from_lease)
        finally:
            if not leased:  # refused, or the counter is unreachable: the lease keeps what it had
                view.leased_tokens += from_lease
        if not leased:
            raise self._tokens_refused(view, tokens)
        self._sync_in_background(key, view, by_call=False)
        window = view.window
        return Reservation(tokens, used, lambda unused: self._give_back(key, window, unused),
                           lambda more: self.charge(key, more))

    def charge(self, key: str, tokens: int) -> None:
        """Tokens used after the fact (no reservation): counted, never refused."""
        if self.tpm and tokens:
            view = self._view(key)
            view.unreported += tokens
            self._sync_in_background(key, view, by_call=False)

    def headers(self, view: KeyView) -> dict[str, str]:
        reset = f"{math.ceil(max(0.0, view.resets_at - self.clock()))}s"
        headers = {}
        if self.rpm:
            remaining = max(0, self.rpm - view.used_requests + view.leased_requests)
            headers.update({"x-ratelimit-limit-requests": str(self.rpm),
                            "x-ratelimit-remaining-requests": str(remaining),
                            "x-ratelimit-reset-requests": reset})
        if self.tpm:
            headers.update({"x-ratelimit-limit-tokens": str(self.tpm),
                            "x-ratelimit-remaining-tokens": str(max(0, self._tokens_left(view))),
                            "x-ratelimit-reset-tokens": reset})
        return headers

    def _view(self, key: str) -> KeyView:
        view = self.keys.setdefault(key, KeyView())
        if self.clock() >= view.resets_at:  # a new window: leases and counts of the last one lapse
            view.leased_requests = view.leased_tokens = view.used_requests = view.used_tokens = 0
            view.window = None
        return view

    def _tokens_left(self, view: KeyView) -> int:
        """Tokens this replica could reserve: the cluster's room as last seen, and its own idle lease."""
        return self.tpm - view.used_tokens - view.unreported + view.leased_tokens

    def _fresh(self, view: KeyView) -> bool:
        return self.clock() - view.last_sync <= TOKEN_SYNC_S

    def _far(self, limit: int, used: int, batch: int) -> bool:
        """Far from the limit, replicas lease in batches and keep what they do not use."""
        return limit - used >= 4 * batch

    async def _check_tokens_left(self, key: str, view: KeyView) -> None:
        if self._tokens_left(view) <= 0 and not self._fresh(view):
            await self._sync(key, view, Ask())  # tokens come back as calls settle: look again
        if self._tokens_left(view) <= 0:
            raise self._over_limit(view, "tokens", self.tpm)

    async def _take_requests(self, key: str, view: KeyView, count: int) -> None:
        # the count only grows in a window: once it leaves no room, the refusal holds until the reset
        room = view.leased_requests + self.rpm - view.used_requests
        if view.leased_requests < count <= room:
            far = self._far(self.rpm, view.used_requests, self.request_batch)
            await self._sync(key, view, Ask(requests=count - view.leased_requests,
                                            extra_requests=self.request_batch if far else 0))
        if view.leased_requests < count:
            raise self._over_limit(view, "requests", self.rpm, f": {count} more needed" if count > 1 else "")
        view.leased_requests -= count

    async def _lease_tokens(self, key: str, view: KeyView, need: int) -> bool:
        """Lease `need` more tokens for a reservation; False when they do not fit."""
        if need > self._tokens_left(view) and self._fresh(view):  # the counter would say no as well
            return False
        far = self._far(self.tpm, view.used_tokens, self.token_batch)
        grant = await self._sync(key, view, Ask(tokens=need, extra_tokens=self.token_batch if far else 0))
        if grant.tokens < need:
            return False
        view.leased_tokens -= need
        return True

    def _give_back(self, key: str, window: int | None, tokens: int) -> None:
        view = self._view(key)
        if view.window == window:  # a reservation of a window that ended lapsed with it
            view.leased_tokens += tokens
            self._sync_in_background(key, view, by_call=False)

    async def _sync(self, key: str, view: KeyView, ask: Ask, hand_back: int = 0) -> Grant:
        """Ask the counter, reporting this replica's tokens and handing back `hand_back` idle ones."""
        view.leased_tokens -= hand_back
        ask.report, view.unreported = view.unreported - hand_back, 0
        try:
            grant = await self.take(key, ask, self.rpm, self.tpm)
        except Exception as e:
            view.leased_tokens += hand_back
            view.unreported += ask.report + hand_back
            log.warning("rate-limit counter unreachable: %r", e)
            raise unavailable("The rate limiter is unavailable; retry shortly.", "rate_limiter_unavailable") from None
        now = self.clock()
        if grant.window != view.window:  # the counter answered for a new window: the last one's leases lapsed
            view.leased_requests = view.leased_tokens = 0
        view.window, view.resets_at, view.last_sync = grant.window, now + grant.reset_in_s, now
        view.leased_requests += grant.requests
        view.leased_tokens += grant.tokens
        view.used_requests, view.used_tokens = grant.used_requests, grant.used_tokens
        return grant

    def _sync_in_background(self, key: str, view: KeyView, by_call: bool) -> None:
        """Top up leases, report tokens and hand back idle ones, without making a call wait."""
        if view.syncing is None or view.syncing.done():
            view.syncing = asyncio.create_task(self._sync_while_due(key, view, by_call))

    async def _sync_while_due(self, key: str, view: KeyView, by_call: bool) -> None:
        try:
            while (due := self._sync_due(view, by_call)) is not None:
                await self.sleep(max(0.0, due - self.clock()))
                await self._sync(key, view, *self._background_ask(view))
                by_call = False
        except ConduitError:
            pass  # logged in _sync; the next call that needs the counter will wait for it

    def _sync_due(self, view: KeyView, by_call: bool) -> float | None:
        """When to ask the counter next in the background; None: no need. A call that just came in
        may top up a low lease or refresh a stale view at once; reports wait up to TOKEN_SYNC_S."""
        extra_requests, extra_tokens = self._top_ups(view)
        if by_call and (extra_requests or extra_tokens or (self.tpm and not self._fresh(view))):
            return self.clock()
        if self.tpm and (view.unreported or self._idle_to_hand_back(view)):
            return view.last_sync + TOKEN_SYNC_S
        return None

    def _top_ups(self, view: KeyView) -> tuple[int, int]:
        """(request units, tokens) to lease ahead: a batch when the lease runs low far from the limit."""
        low_requests = self.rpm and view.leased_requests < self.request_batch \
            and self._far(self.rpm, view.used_requests, self.request_batch)
        low_tokens = self.tpm and view.leased_tokens < self.token_batch \
            and self._far(self.tpm, view.used_tokens, self.token_batch)
        return (self.request_batch if low_requests else 0), (self.token_batch if low_tokens else 0)

    def _idle_to_hand_back(self, view: KeyView) -> int:
        """Idle tokens this replica should give back to the counter, where other replicas can lease
        them: past a few batches far from the limit (top-ups bring it to one or two), all near it."""
        kept = 3 * self.token_batch if self._far(self.tpm, view.used_tokens, self.token_batch) else 0
        return max(0, view.leased_tokens - kept)

    def _background_ask(self, view: KeyView) -> tuple[Ask, int]:
        extra_requests, extra_tokens = self._top_ups(view)
        hand_back = self._idle_to_hand_back(view) if self.tpm else 0
        return Ask(extra_requests=extra_requests, extra_tokens=extra_tokens), hand_back

    def _over_limit(self, view: KeyView, kind: str, limit: int, detail: str = "") -> ConduitError:
        wait = max(1, math.ceil(view.resets_at - self.clock()))
        headers = {**self.headers(view), "retry-after": str(wait)}
        return ConduitError(f"Rate limit reached for {kind} per minute (limit {limit}){detail}. "
                            f"Please try again in {wait}s.", 429, kind, None, "rate_limit_exceeded", headers)

    def _tokens_refused(self, view: KeyView, asked: int) -> ConduitError:
        if asked > self.tpm:
            detail = f": this request may use {asked} tokens (prompt + n × max_tokens); ask for fewer max_tokens"
        else:
            detail = f": this request may use {asked} tokens (prompt + n × max_tokens), " \
                     f"{max(0, self._tokens_left(view))} are left"
        return self._over_limit(view, "tokens", self.tpm, detail)
