"""Per-key rate limits that hold for the whole cluster, and the per-call context (deadline, token
meter) that the admission middleware hands to the `Pipeline`.

The counts live in one named, detached Ray actor (`WindowCounts`): requests and tokens per key in
the current one-minute window. An ingress replica does not ask it on every request: it leases
request units in batches and reports tokens in batches, in the background. It waits for the actor
only when its lease is spent (the first request of a key in a window, or near the limit, where
leases shrink to one unit so the limit stays exact across replicas). A key refused for requests
stays refused in the replica until the window resets, with no actor call."""

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

log = logging.getLogger("ray.serve")
WINDOW_S = 60
TOKEN_SYNC_S = 0.5  # how stale a replica's view of a key's cluster-wide token count may get


@dataclass
class Call:
    """What the admission middleware decided for one HTTP call; read by the Pipeline."""

    deadline: float | None = None  # event-loop time by which the answer must be complete
    charge: Callable[[int], None] = lambda tokens: None  # tokens used, for tokens-per-minute


current_call: ContextVar[Call] = ContextVar("conduit_call", default=Call())


@dataclass
class Grant:
    requests: int  # request units leased by this call
    used_requests: int  # cluster-wide in this window, every lease included
    used_tokens: int
    reset_in_s: float


class WindowCounts:
    """The cluster's usage per key in the current one-minute window (wall-clock aligned)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.window = -1
        self.used: dict[str, list[int]] = {}  # key id -> [requests, tokens]

    def take(self, key: str, want: int, limit: int | None, tokens: int) -> Grant:
        """Add `tokens` to the key's count and lease up to `want` request units under `limit`."""
        now = self.clock()
        window = int(now // WINDOW_S)
        if window != self.window:
            self.window, self.used = window, {}
        used = self.used.setdefault(key, [0, 0])
        used[1] += tokens
        granted = want if limit is None else max(0, min(want, limit - used[0]))
        used[0] += granted
        return Grant(granted, used[0], used[1], (window + 1) * WINDOW_S - now)


def counter_actor():
    """The cluster's one `WindowCounts` for this application, created by the first ingress replica."""
    import ray
    from ray import serve

    app_name = serve.get_replica_context().app_name
    actor = ray.remote(num_cpus=0, max_restarts=-1)(WindowCounts)
    return actor.options(
        name=f"conduit-rate-limits-{app_name}", namespace="conduit", lifetime="detached", get_if_exists=True
    ).remote()


@dataclass
class KeyView:
    """One replica's view of one key in the current window."""

    leased: int = 0  # request units this replica may still admit without asking
    used_requests: int = 0  # cluster-wide, as of the last answer from the counter
    used_tokens: int = 0
    unsent_tokens: int = 0  # charged here, not yet reported
    resets_at: float = 0.0  # monotonic time the window ends
    last_sync: float = -math.inf
    syncing: asyncio.Task | None = field(default=None, repr=False)


class RateLimiter:
    def __init__(self, limits: RateLimitConfig, take: Callable[[str, int, int | None, int], Awaitable[Grant]],
                 clock: Callable[[], float] = time.monotonic):
        self.rpm, self.tpm = limits.requests_per_minute, limits.tokens_per_minute
        self.take, self.clock = take, clock
        self.batch = max(1, (self.rpm or 0) // 50)  # units leased at once, far from the limit
        self.keys: dict[str, KeyView] = {}

    async def admit(self, key: str) -> dict[str, str]:
        """Count one request for `key`: its rate-limit headers, or a 429 when it is over a limit."""
        view = self._view(key)
        # the count only grows in a window: once it reaches the limit, the key is refused here,
        # without asking the counter, until the window resets
        if self.rpm and view.leased == 0 and view.used_requests < self.rpm:
            await self._sync(key, view, self._lease_size(view))
        if self.tpm and view.used_tokens + view.unsent_tokens >= self.tpm:
            raise self._over_limit(view, "tokens", self.tpm)
        if self.rpm:
            if view.leased == 0:
                raise self._over_limit(view, "requests", self.rpm)
            view.leased -= 1
        self._sync_in_background(key, view)
        return self.headers(view)

    def charge(self, key: str, tokens: int) -> None:
        if self.tpm and tokens:
            self._view(key).unsent_tokens += tokens

    def headers(self, view: KeyView) -> dict[str, str]:
        reset = f"{math.ceil(max(0.0, view.resets_at - self.clock()))}s"
        headers = {}
        if self.rpm:
            remaining = max(0, self.rpm - view.used_requests + view.leased)
            headers.update({"x-ratelimit-limit-requests": str(self.rpm),
                            "x-ratelimit-remaining-requests": str(remaining),
                            "x-ratelimit-reset-requests": reset})
        if self.tpm:
            remaining = max(0, self.tpm - view.used_tokens - view.unsent_tokens)
            headers.update({"x-ratelimit-limit-tokens": str(self.tpm),
                            "x-ratelimit-remaining-tokens": str(remaining),
                            "x-ratelimit-reset-tokens": reset})
        return headers

    def _view(self, key: str) -> KeyView:
        view = self.keys.setdefault(key, KeyView())
        if self.clock() >= view.resets_at:  # a new window: leases and counts of the last one lapse
            view.leased = view.used_requests = view.used_tokens = 0
        return view

    def _lease_size(self, view: KeyView) -> int:
        """A batch while the key is far from its limit, one unit near it (no stranded leases)."""
        far = self.rpm is not None and self.rpm - view.used_requests >= 4 * self.batch
        return self.batch if far else 1

    async def _sync(self, key: str, view: KeyView, want: int) -> None:
        tokens, view.unsent_tokens = view.unsent_tokens, 0
        try:
            grant = await self.take(key, want, self.rpm, tokens)
        except Exception as e:
            view.unsent_tokens += tokens
            log.warning("rate-limit counter unreachable: %r", e)
            raise unavailable("The rate limiter is unavailable; retry shortly.", "rate_limiter_unavailable") from None
        now = self.clock()
        if now >= view.resets_at:
            view.leased = 0
        view.resets_at = now + grant.reset_in_s
        view.leased += grant.requests
        view.used_requests, view.used_tokens = grant.used_requests, grant.used_tokens
        view.last_sync = now

    def _sync_in_background(self, key: str, view: KeyView) -> None:
        """Top up the lease before it runs out, and report tokens, without making a request wait."""
        if view.syncing is not None and not view.syncing.done():
            return
        low_lease = self.rpm is not None and view.leased < self.batch and self._lease_size(view) > 1
        stale_tokens = self.tpm is not None and self.clock() - view.last_sync > TOKEN_SYNC_S
        if low_lease or stale_tokens:
            want = self.batch if low_lease else 0
            view.syncing = asyncio.create_task(self._quiet_sync(key, view, want))

    async def _quiet_sync(self, key: str, view: KeyView, want: int) -> None:
        try:
            await self._sync(key, view, want)
        except ConduitError:
            pass  # logged in _sync; the next request that needs the counter will wait for it

    def _over_limit(self, view: KeyView, kind: str, limit: int) -> ConduitError:
        wait = max(1, math.ceil(view.resets_at - self.clock()))
        headers = {**self.headers(view), "retry-after": str(wait)}
        return ConduitError(f"Rate limit reached for {kind} per minute (limit {limit}). Please try again in {wait}s.",
                            429, kind, None, "rate_limit_exceeded", headers)
