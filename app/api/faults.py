"""How the Pipeline bounds a generation: the call's deadline (`app.limits.current_call`), and Ray's
failures turned into API errors. Streams raise these after their 200; adapters then send them as an
error event, so no stream ends silently."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from app.api.errors import ConduitError, unavailable
from app.engine.async_engine import EngineDeadError
from app.limits import current_call

# the model replica died, was stopped, or its engine loop died: nothing more will come from it
REPLICA_LOST = (RayActorError, DeploymentUnavailableError, EngineDeadError)


def deadline_exceeded() -> ConduitError:
    # 504, as a gateway does when what it waits on is too slow (408 would blame the client's upload)
    return ConduitError("The request did not complete within its deadline (ingress.request_timeout_s or the "
                        "x-request-timeout header).", 504, "timeout_error", None, "deadline_exceeded")


def overloaded() -> ConduitError:
    return unavailable("The server is at capacity; retry shortly.", "server_overloaded")


def replica_failed() -> ConduitError:
    return unavailable("The model replica serving this request failed; retry.", "replica_unavailable")


@asynccontextmanager
async def bounded():
    """Run the block under the current call's deadline; Ray's failures become 503s."""
    timeout = asyncio.timeout_at(current_call.get().deadline)
    try:
        async with timeout:
            yield
    except TimeoutError:
        if not timeout.expired():
            raise
        raise deadline_exceeded() from None
    except BackPressureError:
        raise overloaded() from None
    except REPLICA_LOST:
        raise replica_failed() from None


async def bounded_iter(items: AsyncIterator) -> AsyncIterator:
    """`items`, each awaited as under `bounded()`. Closing this closes `items` (aborting the request).
    One timer for the whole stream, not one `bounded()` per item (a stream's per-token path): past
    the deadline an item still awaited is cancelled, and none is awaited after it."""
    deadline, when = _Deadline(), current_call.get().deadline
    timer = None if when is None else asyncio.get_running_loop().call_at(when, deadline.expire)
    try:
        while True:
            if deadline.expired:
                raise deadline_exceeded()
            deadline.wait(asyncio.current_task())
            try:
                item = await anext(items)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if deadline.cancelled and deadline.task.uncancel() == deadline.cancelling:
                    raise deadline_exceeded() from None  # our cancellation, nobody else's
                raise
            except BackPressureError:
                raise overloaded() from None
            except REPLICA_LOST:
                raise replica_failed() from None
            finally:
                deadline.waiting = False
            yield item
    finally:
        if timer is not None:
            timer.cancel()
        await items.aclose()


class _Deadline:
    """A stream's deadline as `bounded_iter` keeps it: `expire` cancels the task awaiting an item."""

    def __init__(self):
        self.task: asyncio.Task | None = None
        self.cancelling = 0  # the task's cancellation requests before ours
        self.waiting = self.expired = self.cancelled = False

    def wait(self, task: asyncio.Task) -> None:
        self.task, self.cancelling, self.waiting = task, task.cancelling(), True

    def expire(self) -> None:
        self.expired = True
        if self.waiting and not self.cancelled:
            self.cancelled = True
            self.task.cancel()
