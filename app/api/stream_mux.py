"""Streams multiplexed per (ingress replica, model replica): the deltas of every stream one model
replica serves to one ingress replica travel together, one Ray message per wake-up (at most one per
engine step), instead of one message per stream. What a token costs the serving path then no longer
grows with the number of streams.

Each request is still its own Serve call (`Model.generate(prepared, Route)`): Serve's routing, queue
lengths, backpressure, drain and cancellation see it as before. Only its deltas take another path:

- the model replica (`Outbox`, one per ingress) collects every delta for that ingress and sends them
  as one batch on a long-lived streaming call, the ingress's *channel* to that replica;
- the ingress (`StreamMux`) reads each channel and hands every delta to its stream's `Inbox`.

A replica without a channel from the calling ingress streams the request's deltas on the request's
own call, as before, and first says so (`ChannelWanted`): once that stream has finished, the ingress
opens a channel to that replica (`ChannelOpen`, which the router sends to that replica), and later
requests use it. One stream never switches path, so its deltas arrive in order. A channel closes
itself once no stream has used it for `CHANNEL_IDLE_S`, so a draining replica is not held open by it.
A channel holds one of its replica's `max_ongoing_requests` slots while it is open."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from app.api.disconnects import cancel_call, cancelled_unless_finished
from app.api.errors import unavailable
from app.api.faults import REPLICA_LOST
from app.engine.engine import RequestOutput

log = logging.getLogger("ray.serve")
CHANNEL_IDLE_S = 2.0  # a channel no stream used for this long ends (drain waits at most this for it)
CHANNEL_OPEN_TIMEOUT_S = 10.0  # a channel the router could not place in this long is given up
LOST_REPLICA_RETRIES = 2  # a request whose replica died before its first delta is sent again this often


@dataclass(frozen=True)
class Route:
    """Passed with a request: which ingress asks, and its stream's key there."""

    ingress: str
    key: int


@dataclass(frozen=True)
class ChannelOpen:
    """Opens `ingress`'s channel on the model replica `replica` (deployments/router.py sends it there)."""

    ingress: str
    replica: str


@dataclass(frozen=True)
class ChannelHello:
    """A channel's first item: the replica it reached; `accepted` False if that replica already has one."""

    replica: str
    accepted: bool


@dataclass(frozen=True)
class ChannelWanted:
    """First item of a request streamed on its own call: the replica had no channel from its ingress."""

    replica: str


@dataclass(frozen=True)
class ChannelCarried:
    """The only item of a request's own call when its channel carries its deltas. A call must yield
    something: Serve's gRPC transport sends whether the replica accepted the call as initial metadata,
    which gRPC may drop on a stream with no messages; the caller's Serve then raised "Unexpected
    error (StatusCode.OK)" for an accepted request (CI's multinode 500)."""


# model replica side ---------------------------------------------------------------------------
def channel_closed() -> Exception:
    return unavailable("The stream's channel to the ingress closed; retry.", "replica_unavailable")


class Outbox:
    """One ingress's pending deltas on a model replica. `put` never waits; `batches` yields everything
    pending as one list of (key, RequestOutput | Exception), merging a stream's deltas that waited."""

    def __init__(self):
        self._pending: dict[int, list] = {}
        self._sent: dict[int, asyncio.Future] = {}  # streams whose last item awaits its batch
        self._wake = asyncio.Event()
        self.users = 0  # streams bound to this channel now
        self.closed = False

    def put(self, key: int, item: RequestOutput | Exception) -> None:
        items = self._pending.setdefault(key, [])
        if items and isinstance(item, RequestOutput) and isinstance(items[-1], RequestOutput):
            items[-1].merge(item)
        else:
            items.append(item)
        self._wake.set()

    def discard(self, key: int) -> None:
        """A cancelled stream: nobody reads what it had pending."""
        self._pending.pop(key, None)

    async def flushed(self, key: int) -> None:
        """Until `key`'s pending items have been handed to Ray (its stream's call may then end)."""
        if key not in self._pending:
            return
        if self.closed:
            raise channel_closed()
        future = self._sent[key] = asyncio.get_running_loop().create_future()
        await future

    async def batches(self, idle_s: float = CHANNEL_IDLE_S) -> AsyncIterator[list[tuple[int, object]]]:
        try:
            while True:
                if not self._pending:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), idle_s)
                    except TimeoutError:
                        if self.users == 0 and not self._pending:
                            return
                        continue
                batch, self._pending = self._pending, {}
                yield [(key, item) for key, items in batch.items() for item in items]
                for key in batch:
                    future = self._sent.pop(key, None)
                    if future is not None and not future.done():
                        future.set_result(None)
        finally:
            self.closed = True
            for future in self._sent.values():  # the channel broke: those streams' calls fail instead
                if not future.done():
                    future.set_exception(channel_closed())


class Outboxes:
    """A model replica's open channels, by ingress replica id."""

    def __init__(self, replica: str):
        self.replica = replica
        self._open: dict[str, Outbox] = {}
        self.opened = 0  # channels opened so far
        self.carried = 0  # streams whose deltas went through a channel so far

    def stats(self) -> dict:
        return {"replica": self.replica, "open": len(self._open), "opened": self.opened, "carried": self.carried}

    def get(self, ingress: str) -> Outbox | None:
        outbox = self._open.get(ingress)
        return None if outbox is None or outbox.closed else outbox

    async def serve(self, request: ChannelOpen) -> AsyncIterator:
        """The channel call's items: a ChannelHello, then batches until it idles out."""
        if self.get(request.ingress) is not None:
            yield ChannelHello(self.replica, accepted=False)
            return
        outbox = self._open[request.ingress] = Outbox()
        self.opened += 1
        log.info("stream channel from ingress %s opened", request.ingress)
        try:
            yield ChannelHello(self.replica, accepted=True)
            async for batch in outbox.batches():
                yield batch
        finally:
            outbox.closed = True
            if self._open.get(request.ingress) is outbox:
                del self._open[request.ingress]
            log.info("stream channel from ingress %s closed", request.ingress)


async def pump(outbox: Outbox, key: int, deltas: AsyncIterator[RequestOutput]) -> None:
    """Send one stream's deltas (and the error that ends it, if one does) through `outbox`; returns
    once its last item has been handed to Ray."""
    outbox.users += 1
    try:
        async for out in deltas:
            if outbox.closed:
                raise channel_closed()
            outbox.put(key, out)
    except asyncio.CancelledError:
        outbox.discard(key)
        raise
    except Exception as e:  # the stream's own error (already in the API's terms): its last item
        if outbox.closed:  # nothing more reaches the ingress that way: the call itself fails
            raise
        outbox.put(key, e)
    finally:
        outbox.users -= 1
        await deltas.aclose()
    await outbox.flushed(key)


# ingress side ---------------------------------------------------------------------------------
class Inbox:
    """One stream's arrivals in the ingress, from its channel or its own call."""

    def __init__(self):
        self._items: deque = deque()
        self._ready = asyncio.Event()
        self.replica: str | None = None  # the channel that fed it, if one did

    def put(self, item) -> None:
        self._items.append(item)
        self._ready.set()

    async def next(self) -> RequestOutput:
        """Every delta that has arrived, merged; an error is raised once the deltas before it are out."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        first = self._items.popleft()
        if isinstance(first, BaseException):
            raise first
        while self._items and isinstance(self._items[0], RequestOutput):
            first.merge(self._items.popleft())
        return first


class StreamMux:
    """An ingress replica's end: `generate` runs one request and yields its deltas."""

    def __init__(self, ingress: str):
        self.ingress = ingress
        self._inboxes: dict[int, Inbox] = {}
        self._channels: dict[str, asyncio.Task] = {}  # model replica id -> its channel's reader
        self._keys = itertools.count()

    async def generate(self, handle, prepared) -> AsyncIterator[RequestOutput]:
        """`prepared`'s deltas from the model deployment behind `handle`. A replica lost before the
        request's first delta costs the client nothing: nothing has reached it, and the engine state
        died with the replica, so the request is sent again (the router no longer picks a dead replica).
        After its first delta a lost replica ends the stream. Closing this early cancels the request's
        call (the replica aborts the sequence); so does its client going away."""
        for attempt in range(LOST_REPLICA_RETRIES + 1):
            deltas = self._attempt(handle, prepared)
            try:
                first = await anext(deltas)
                break
            except REPLICA_LOST as e:
                if attempt == LOST_REPLICA_RETRIES:
                    raise
                log.warning("request %s: model replica lost before its first token (%r); sending it again",
                            prepared.request_id, e)
        try:
            yield first
            async for out in deltas:
                yield out
        finally:
            await deltas.aclose()

    async def _attempt(self, handle, prepared) -> AsyncIterator[RequestOutput]:
        """One call of the request and its deltas, from whichever path carries them."""
        key = next(self._keys)
        inbox = self._inboxes[key] = Inbox()
        call = handle.options(stream=True).generate.remote(prepared, Route(self.ingress, key))
        reader = asyncio.create_task(self._read_call(handle, call, inbox))
        finished = False
        try:
            with cancelled_unless_finished(call):
                while not finished:
                    out = await inbox.next()
                    finished = out.finished
                    yield out
        finally:
            del self._inboxes[key]
            if not finished:
                reader.cancel()

    async def _read_call(self, handle, call, inbox: Inbox) -> None:
        """The request's own call: its deltas when no channel carries them, and its failure (replica
        lost, backpressure, a refusal) whichever path the deltas take. A channel the replica asked for
        is opened once this call's stream has finished: it then takes the replica slot
        (max_ongoing_requests) this call leaves, never one that requests arriving with this one need."""
        wanted = None
        try:
            async for item in call:
                if isinstance(item, ChannelCarried):
                    continue
                if isinstance(item, ChannelWanted):
                    wanted = item.replica
                    continue
                inbox.put(item)
                if wanted is not None and item.finished:
                    self._open(handle, wanted)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            inbox.put(e)

    def _open(self, handle, replica: str) -> None:
        if replica not in self._channels:
            # In a context of its own: the channel outlives the request that asked for it, so it must
            # not be that request's child call (Serve cancels those with it) nor hold its context.
            self._channels[replica] = asyncio.create_task(self._read_channel(handle, replica),
                                                          context=contextvars.Context())

    async def _read_channel(self, handle, replica: str) -> None:
        call = handle.options(stream=True).channel.remote(ChannelOpen(self.ingress, replica))
        try:
            async with asyncio.timeout(CHANNEL_OPEN_TIMEOUT_S):
                hello = await anext(call)
            if not hello.accepted:
                return
            if hello.replica != replica:  # the router placed it elsewhere: it serves that replica
                self._channels.pop(replica, None)
                replica = hello.replica
                self._channels.setdefault(replica, asyncio.current_task())
            async for batch in call:
                for key, item in batch:
                    inbox = self._inboxes.get(key)
                    if inbox is not None:
                        inbox.replica = replica
                        inbox.put(item)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the replica died or the channel broke: the streams it fed end with it
            log.warning("stream channel to model replica %s failed: %r", replica, e)
            for inbox in self._inboxes.values():
                if inbox.replica == replica:
                    inbox.put(e)
        finally:
            cancel_call(call)  # a no-op once it has ended; frees the router's attempt if it was never placed
            if self._channels.get(replica) is asyncio.current_task():
                del self._channels[replica]
