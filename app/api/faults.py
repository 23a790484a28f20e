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
        raise unavailable("The server is at capacity; retry shortly.", "server_overloaded") from None
    except REPLICA_LOST:
        raise unavailable("The model replica serving this request failed; retry.", "replica_unavailable") from None


async def bounded_iter(items: AsyncIterator) -> AsyncIterator:
    """`items`, each awaited under `bounded()`. Closing this closes `items` (aborting the request)."""
    try:
        while True:
            async with bounded():
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
            yield item
    finally:
        await items.aclose()
