"""The batch runner in each ingress replica: it claims batches through the store (one replica per
batch, a lease renewed by heartbeats and taken over when they stop), and runs each one's lines
through the Pipeline at the `batch` priority class, detached from any HTTP request, recording each
answered line as it finishes. A batch claimed again (a restart, a replica gone) resumes: lines
already recorded are not run again.

validating -> in_progress -> finalizing -> completed, or failed (validation), expired (past its
completion window), cancelling -> cancelled (a cancel from any replica; seen at the next heartbeat)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid

from app.api.disconnects import open_calls
from app.api.pipeline import Pipeline
from app.api.wire.batches_lines import answer, read_input
from app.config import StoreConfig
from app.limits import Call, current_call
from app.store import BatchStore, FileStore

log = logging.getLogger("ray.serve")
LEASE_S = 30.0  # a claim without a heartbeat for this long is taken over by another replica
HEARTBEAT_S = 2.0  # also how soon a cancel from another replica is seen
MAX_BATCHES = 4  # batches one replica runs at once
# A line the server refuses only for now (503: a model replica lost, at capacity, this server
# stopping; 429: the key's rate limit) is asked again, waiting 1, 2, then 4 s between tries, for
# at most RETRY_FOR_S in all; only then is the refusal its answer. Recorded at once, a replica's
# restart would fail every line run meanwhile, and a killed server's last answers would be these.
RETRY_STATUS = (429, 503)
RETRY_FOR_S = 120.0


class BatchRunner:
    def __init__(self, pipeline: Pipeline, batches: BatchStore, files: FileStore, config: StoreConfig):
        self.pipeline, self.batches, self.files, self.config = pipeline, batches, files, config
        self.name = uuid.uuid4().hex  # this replica's claims
        self.running: dict[str, asyncio.Task] = {}
        self.lines: dict[str, asyncio.Future] = {}  # by batch: its lines in flight (what a cancel stops)
        self.loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self.loop_task = asyncio.get_running_loop().create_task(self._claim_forever(), name="conduit-batches")

    def wake(self) -> None:
        """A batch was just created here: look for it now rather than at the next poll."""
        if self.loop_task is not None and len(self.running) < MAX_BATCHES:
            asyncio.get_running_loop().create_task(self._claim_once())

    async def stop(self) -> None:
        """The replica stops: running batches stop where they are, their claims given up for another
        replica (or this one restarted) to resume them."""
        tasks = [t for t in (self.loop_task, *self.running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _claim_forever(self) -> None:
        while True:
            try:
                while len(self.running) < MAX_BATCHES and await self._claim_once():
                    pass
            except Exception:  # a database briefly away must not end the runner
                log.exception("batches: claiming failed; retrying")
            await asyncio.sleep(self.config.batch_poll_s)

    async def _claim_once(self) -> bool:
        claimed = await self.batches.claim(self.name, time.time(), LEASE_S)
        if claimed is None:
            return False
        owner, batch = claimed
        context = contextvars.copy_context()
        # the lines run as the batch's owner, at the batch class; no HTTP call's end cancels them
        context.run(current_call.set, Call(tenant=owner, max_class="batch"))
        context.run(open_calls.set, None)
        task = asyncio.get_running_loop().create_task(self._run(owner, batch), context=context)
        self.running[batch["id"]] = task
        task.add_done_callback(lambda _: self.running.pop(batch["id"], None))
        return True

    async def _run(self, owner: str, batch: dict) -> None:
        work = asyncio.current_task()
        heartbeat = asyncio.create_task(self._heartbeat(batch["id"], work))
        try:
            await self._drive(owner, batch)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("batches: batch %s failed to run; another claim will retry it", batch["id"])
        finally:
            heartbeat.cancel()
            await asyncio.shield(self.batches.release(self.name, batch["id"]))

    async def _heartbeat(self, batch_id: str, work: asyncio.Task) -> None:
        """Renew the claim; stop the lines when the batch is being cancelled or the claim is lost."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                status = await self.batches.renew(self.name, batch_id, time.time() + LEASE_S)
            except Exception:
                continue  # the store briefly away: the lease covers a while
            if status is None:
                work.cancel()  # another replica holds it now
                return
            if status == "cancelling" and batch_id in self.lines:
                self.lines[batch_id].cancel()  # _drive then ends it cancelled

    async def _drive(self, owner: str, batch: dict) -> None:
        """Move the batch on from whatever status it is in, to its end."""
        while True:
            current = await self.batches.get(owner, batch["id"])
            if current is None:
                return
            batch = current
            status = batch["status"]
            if status == "validating":
                await self._validate(owner, batch)
            elif status == "in_progress":
                if time.time() > batch["expires_at"]:
                    await self._end(owner, batch, "expired", ("in_progress",))
                    return
                await self._run_lines(owner, batch)
                await self.batches.advance(self.name, {**batch, "status": "finalizing",
                                                       "finalizing_at": int(time.time())}, ("in_progress",))
            elif status == "finalizing":
                await self._end(owner, batch, "completed", ("finalizing",))
            elif status == "cancelling":
                await self._end(owner, batch, "cancelled", ("cancelling",))
            else:
                return

    async def _validate(self, owner: str, batch: dict) -> None:
        now = int(time.time())
        parsed = await self._read(batch)
        if parsed.errors:
            await self.batches.advance(self.name, {**batch, "status": "failed", "failed_at": now,
                                                   "errors": {"object": "list", "data": parsed.errors}},
                                       ("validating",))
            return
        await self.batches.advance(self.name, {**batch, "status": "in_progress", "in_progress_at": now,
                                               "request_counts": {"total": len(parsed.lines), "completed": 0,
                                                                  "failed": 0}}, ("validating",))

    async def _read(self, batch: dict):
        data = await self.files.read(batch["input_file_id"])  # None: its bytes are gone
        return read_input(data or b"", batch["endpoint"])

    async def _run_lines(self, owner: str, batch: dict) -> None:
        lines = (await self._read(batch)).lines
        done = await self.batches.answered(batch["id"])
        todo = iter([(position, line) for position, line in enumerate(lines) if position not in done])

        async def worker() -> None:
            for position, line in todo:  # the workers share one iterator: each line is taken once
                failed, output = await self._answer(line)
                await self.batches.record(batch["id"], position, failed, output)

        workers = [asyncio.create_task(worker()) for _ in range(self.config.batch_concurrency)]
        self.lines[batch["id"]] = running = asyncio.gather(*workers)
        try:
            await running
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # the replica stops
            # else a cancel: the lines in flight stop unanswered
        finally:
            self.lines.pop(batch["id"], None)
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _answer(self, line) -> tuple[bool, str]:
        """(whether it failed, its output line), asked again while it is refused only for now."""
        waited, pause = 0.0, 1.0
        while True:
            status, output = await answer(self.pipeline, line)
            if status not in RETRY_STATUS or waited >= RETRY_FOR_S:
                return status != 200, output
            log.warning("batches: line %r refused for now; asking again in %.0f s", line.custom_id, pause)
            await asyncio.sleep(pause)
            waited, pause = waited + pause, min(2 * pause, 4.0)

    async def _end(self, owner: str, batch: dict, status: str, expect: tuple[str, ...]) -> None:
        """Write the output and error files of what was answered, and the batch's final status."""
        completed, failed = await self.batches.counts(batch["id"])
        ids = {}
        for kind, errors in (("output", False), ("error", True)):
            lines = await self.batches.output(batch["id"], errors)
            if lines:
                data = ("\n".join(lines) + "\n").encode()
                made = await self.files.write(owner, data, "batch_output", f"{batch['id']}_{kind}.jsonl")
                ids[f"{kind}_file_id"] = made["id"]
        now = int(time.time())
        total = batch["request_counts"]["total"]
        final = {**batch, **ids, "status": status, f"{status}_at": now,
                 "request_counts": {"total": total, "completed": completed, "failed": failed}}
        if not await self.batches.advance(self.name, final, expect):
            for file_id in ids.values():  # it moved on meanwhile (cancelled): these files are no one's
                await self.files.delete(owner, file_id)
