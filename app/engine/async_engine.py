"""Runs an `LLMEngine` in a background thread and exposes each request as an async stream.

Torch releases the GIL inside its kernels, so the event loop that serves requests keeps running
while a step computes. The engine itself is touched only by its thread: requests and aborts are
posted to an inbox and applied between steps (that is how new requests join a running batch)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable

from app.engine.engine import LLMEngine, RequestOutput
from app.engine.errors import QueueFull, RequestRejected
from app.engine.lora.adapter import LoraAdapter
from app.engine.sampling_params import GuidedDecoding, SamplingParams
from app.engine.schema_limits import SchemaError


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: list[tuple] = []
        self._lock = threading.Lock()
        self._arriving: dict[str, int] = {}  # admitted requests not yet added to the engine, per tenant
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}  # by engine id
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.last_step_end = time.monotonic()

    def ensure_started(self) -> None:
        """Start the engine thread, bound to the running event loop (call from inside it)."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="conduit-engine", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def check_health(self, stall_limit_s: float) -> None:
        """Raise when the loop has died, or has work but finished no step for `stall_limit_s`."""
        if self._thread is not None and not self.alive:
            raise EngineDeadError(f"engine loop died: {self.error!r}")
        if self.engine.has_work() and time.monotonic() - self.last_step_end > stall_limit_s:
            raise EngineDeadError(f"engine stalled: no step finished in {stall_limit_s:.0f} s")

    def _post(self, command: tuple) -> None:
        with self._lock:
            self._inbox.append(command)
        self._wake.set()

    def admit(self, tenant: str) -> Callable[[], None]:
        """Let one request of `tenant` in, or raise QueueFull (why). From now until the engine thread
        adds it (or the returned release is called: it is idempotent, for a request that never gets
        that far) it counts as waiting. Requests posted between two engine steps are in no queue yet,
        so without this a flood arriving within one step would all pass the queue check."""
        with self._lock:
            arriving = self._arriving.get(tenant, 0)
            why = self.engine.queue_full(tenant, arriving, sum(self._arriving.values()))
            if why is not None:
                raise QueueFull(why)
            self._arriving[tenant] = arriving + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._arriving[tenant] - 1
                if left:
                    self._arriving[tenant] = left
                else:
                    del self._arriving[tenant]

        return release

    def flush_interval(self, min_interval: float, max_messages_per_s: float | None) -> float:
        """How long a stream coalesces deltas before sending. Every message crosses Ray (and the
        HTTP proxy) and costs CPU on both ends, so the replica's total message rate is capped: with
        S open streams each waits at least S / max_messages_per_s, never less than `min_interval`."""
        if not max_messages_per_s:
            return min_interval
        return max(min_interval, len(self._streams) / max_messages_per_s)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams,
        min_interval: float = 0.0, max_messages_per_s: float | None = None, priority: int = 0, tenant: str = "",
        lora: LoraAdapter | None = None, admitted: Callable[[], None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields merged deltas (the first at once, then at most one per `flush_interval()`), the last
        with `finished=True`. Closing the iterator early aborts the request and frees its KV blocks.
        Raises the engine's error for this request (a RequestRejected, or why its sequence failed).

        `request_id` is the caller's, for logs only: the engine keys the request by an id of its own,
        so two requests that bring the same id (a client's x-request-id) never share a stream.
        `admitted`: the release `admit()` gave this request, called once the engine has added it."""
        self.ensure_started()
        if not self.alive:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        if params.guided is not None and params.guided.compiled is None:
            params.guided.compiled = await self._compile(params.guided)
        engine_id = f"{request_id}#{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[engine_id] = queue
        self._post(("add", engine_id, prompt_ids, params, priority, tenant, lora, admitted))
        finished = False
        last_flush = -1e9
        try:
            while not finished:
                out = _drain(await queue.get(), queue)
                wait = last_flush + self.flush_interval(min_interval, max_messages_per_s) - time.monotonic()
                if not out.finished and wait > 0:
                    await asyncio.sleep(wait)
                    out = _drain(out, queue)
                last_flush = time.monotonic()
                finished = out.finished
                out.request_id = request_id
                yield out
        finally:
            self._streams.pop(engine_id, None)
            if not finished:
                self._post(("abort", engine_id))

    async def _compile(self, guided: GuidedDecoding):
        """The grammar of a guided request, compiled in the compiler's own time-limited pool: never
        on the engine thread, where one slow schema would stall every sequence."""
        from app.engine.guided import compile_with_limit  # xgrammar loads only where it is used

        compiler = await asyncio.to_thread(self.engine.guided_compiler)  # its first build reads the vocabulary
        try:
            return await compile_with_limit(compiler, guided)
        except SchemaError as e:  # CompileTimeout included: too complex for this server
            raise RequestRejected(str(e), guided.param) from None

    # engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._apply_inbox()
                if not self.engine.has_work():
                    self._wake.wait()
                    self._wake.clear()
                    self.last_step_end = time.monotonic()  # idle time is not a stall
                    continue
                outputs = self.engine.step()
                self.last_step_end = time.monotonic()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as e:  # the loop died: every waiting stream must hear of it
            self.error = e
            self._loop.call_soon_threadsafe(self._fail_all, e)
            raise

    def _apply_inbox(self) -> None:
        with self._lock:
            commands, self._inbox = self._inbox, []
        for command in commands:
            if command[0] == "abort":
                self.engine.abort_request(command[1])
                continue
            _, request_id, prompt_ids, params, priority, tenant, lora, admitted = command
            try:
                self.engine.add_request(request_id, prompt_ids, params, priority, tenant, lora)
            except Exception as e:  # refused (RequestRejected) or failed on arrival: this request only
                failed = RequestOutput(request_id, finished=True, finish_reason="error", error=e)
                self._loop.call_soon_threadsafe(self._dispatch, [failed])
            finally:
                if admitted is not None:  # it is in the scheduler's counts now (or refused)
                    admitted()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out if out.error is None else out.error)

    def _fail_all(self, error: BaseException) -> None:
        for queue in self._streams.values():
            queue.put_nowait(EngineDeadError(f"engine loop died: {error!r}"))


def _drain(first, queue: asyncio.Queue) -> RequestOutput:
    """Merge everything already queued into `first`; errors are raised."""
    if isinstance(first, BaseException):
        raise first
    while not queue.empty():
        nxt = queue.get_nowait()
        if isinstance(nxt, BaseException):
            raise nxt
        first.merge(nxt)
    return first
