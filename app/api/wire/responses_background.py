"""Background responses (`background: true`): the call returns the queued response at once and the
generation runs on in this ingress replica, detached from the HTTP request; its end is written to
the store. A cancel may arrive at any ingress replica: it marks the stored response cancelled, and
the replica running it notices (at once when it is the same one, else within WATCH_S)."""

from __future__ import annotations

import asyncio
import contextvars
import copy
import logging

from app.api.disconnects import open_calls
from app.api.errors import ConduitError, stream_failure
from app.api.pipeline import Pipeline
from app.api.protocol import GenerateRequest
from app.api.wire.responses_stream import ResponseOutput
from app.store import ResponseStore

log = logging.getLogger("ray.serve")
WATCH_S = 0.5  # how often a running background response checks the store for a cancel
_detached: set[asyncio.Task] = set()


def detach(coroutine) -> None:
    """Run `coroutine` to its end even if the caller is cancelled (a store write after a stream)."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _detached.add(task)
    task.add_done_callback(_detached.discard)
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("store: writing a response failed", exc_info=task.exception())


class BackgroundRuns:
    def __init__(self, pipeline: Pipeline, store: ResponseStore):
        self.pipeline, self.store = pipeline, store
        self.running: dict[str, asyncio.Task] = {}
        self.stopping = False

    async def start(self, owner: str, response: dict, items: list[dict], req: GenerateRequest) -> dict:
        await self.store.save(owner, response, items, [])
        queued = copy.deepcopy(response)
        context = contextvars.copy_context()
        context.run(open_calls.set, None)  # not the HTTP request's calls: its end must not cancel this run
        task = asyncio.get_running_loop().create_task(self._run(response, req), context=context)
        self.running[response["id"]] = task
        task.add_done_callback(lambda _: self.running.pop(response["id"], None))
        return queued

    def cancel_local(self, response_id: str) -> None:
        task = self.running.get(response_id)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        """The replica is stopping: what still runs fails (its clients see it when they poll)."""
        self.stopping = True
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, response: dict, req: GenerateRequest) -> None:
        output = ResponseOutput(response, req)
        response["status"] = "in_progress"
        if not await self.store.set_status(response):
            return  # cancelled or deleted while queued
        watcher = asyncio.create_task(self._watch(response["id"], asyncio.current_task()))
        try:
            (out,) = await self.pipeline.complete(req)
            output.feed(out)
        except asyncio.CancelledError:
            if not self.stopping:
                return  # cancelled: the cancel route wrote the status
            output.fail(ConduitError("The server stopped before this response completed.", 503, "server_error"))
        except Exception as e:
            output.fail(stream_failure(e))
        finally:
            watcher.cancel()
        await self.store.finish(response, response["output"])

    async def _watch(self, response_id: str, task: asyncio.Task) -> None:
        """Cancel `task` once its stored status says it no longer runs (a cancel via another replica)."""
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                status = await self.store.status(response_id)
            except Exception:
                continue  # the store briefly away: keep running
            if status != "in_progress":
                task.cancel()
                return
