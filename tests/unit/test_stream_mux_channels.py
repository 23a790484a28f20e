"""The stream channels' two ends without Ray (app/api/stream_mux.py): a model replica's Outbox sends
every stream's pending deltas as one batch and a stream's call ends only once its last delta is in a
batch; the ingress's Inbox hands a stream its deltas merged, in order, and its error after them."""

import asyncio

import pytest

from app.api.errors import ConduitError
from app.api.stream_mux import Inbox, Outbox, pump
from app.engine.engine import RequestOutput


def delta(*ids: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", token_ids=list(ids), finished=finished, num_output_tokens=ids[-1] if ids else 0)


async def deltas(*outputs, error: Exception | None = None):
    for out in outputs:
        await asyncio.sleep(0)
        yield out
    if error is not None:
        raise error


async def read(outbox: Outbox, into: list) -> None:
    async for batch in outbox.batches(idle_s=0.05):
        into.append(batch)


def test_one_batch_carries_every_stream_and_merges_a_streams_waiting_deltas():
    async def run():
        outbox = Outbox()
        outbox.put(1, delta(1))
        outbox.put(2, delta(7))
        outbox.put(1, delta(2, 3))
        batches = []
        await read(outbox, batches)  # ends: nothing pending, no stream bound, idle past 0.05 s
        return batches, outbox.closed

    batches, closed = asyncio.run(run())
    assert [[(key, out.token_ids) for key, out in batch] for batch in batches] == [[(1, [1, 2, 3]), (2, [7])]]
    assert closed


def test_pump_returns_once_its_last_delta_is_in_a_batch_and_an_error_is_the_last_item():
    async def run():
        outbox = Outbox()
        batches = []
        reader = asyncio.create_task(read(outbox, batches))
        await pump(outbox, 1, deltas(delta(1), delta(2, finished=True)))
        sent_before_return = [item for batch in batches for key, item in batch if key == 1]
        failure = ConduitError("boom", 500)
        await pump(outbox, 2, deltas(delta(5), error=failure))
        await reader
        return sent_before_return, [item for batch in batches for key, item in batch if key == 2], failure

    sent, second, failure = asyncio.run(run())
    assert [i for out in sent for i in out.token_ids] == [1, 2] and sent[-1].finished
    assert second[-1] is failure and second[0].token_ids == [5]


def test_a_channel_stays_open_while_a_stream_is_bound_and_a_cancelled_stream_sends_nothing_more():
    async def run():
        outbox = Outbox()
        batches = []
        reader = asyncio.create_task(read(outbox, batches))
        gate = asyncio.Event()

        async def slow():
            yield delta(1)
            await gate.wait()  # longer than the idle limit
            yield delta(2)

        stream = asyncio.create_task(pump(outbox, 1, slow()))
        await asyncio.sleep(0.2)
        open_while_bound = not outbox.closed
        stream.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stream
        await reader
        return open_while_bound, batches

    open_while_bound, batches = asyncio.run(run())
    assert open_while_bound
    assert [[(key, out.token_ids) for key, out in batch] for batch in batches] == [[(1, [1])]]


def test_a_stream_call_fails_when_its_channel_closed_before_its_last_delta_went_out():
    async def run():
        outbox = Outbox()
        outbox.put(1, delta(1))
        outbox.closed = True
        with pytest.raises(ConduitError) as raised:
            await outbox.flushed(1)
        return raised.value

    assert asyncio.run(run()).code == "replica_unavailable"


def test_inbox_merges_what_arrived_and_raises_an_error_after_the_deltas_before_it():
    async def run():
        inbox = Inbox()
        inbox.put(delta(1))
        inbox.put(delta(2))
        inbox.put(ValueError("gone"))
        inbox.put(delta(3))
        first = await inbox.next()
        with pytest.raises(ValueError):
            await inbox.next()
        return first

    assert asyncio.run(run()).token_ids == [1, 2]
