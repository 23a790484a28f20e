"""Batches (OpenAI's Batch API): each batch's wire object, the ingress replica that runs it (a claim
held by heartbeats, taken over when they stop), and its answered lines, recorded one by one as they
finish so that a batch resumed elsewhere answers no line twice. Reads and writes from the routes
name the owner (the API key's id); the runner's name the claim it holds."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from app.store.db import Database
from app.store.schema import batch_lines, batches

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")  # a runner still has work on these
CANCELLABLE = ("validating", "in_progress")


class BatchStore:
    def __init__(self, db: Database):
        self.db = db
        db.expiring.append(self)

    # the routes ---------------------------------------------------------------------------------
    async def create(self, owner: str, batch: dict) -> None:
        async with self.db.begin() as conn:
            await conn.execute(batches.insert().values(
                id=batch["id"], owner=owner, created_at=batch["created_at"], status=batch["status"], body=batch))

    async def get(self, owner: str, batch_id: str) -> dict | None:
        async with self.db.connect() as conn:
            batch = await conn.scalar(sa.select(batches.c.body).where(*_owned(owner, batch_id)))
            return None if batch is None else await _live(conn, batch)

    async def list(self, owner: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """(a page of the owner's batches, newest first, and whether more follow); KeyError when
        `after` names no batch of the owner."""
        async with self.db.connect() as conn:
            query = sa.select(batches.c.body).where(batches.c.owner == owner)
            if after is not None:
                at = await conn.scalar(sa.select(batches.c.created_at).where(*_owned(owner, after)))
                if at is None:
                    raise KeyError(after)
                query = query.where(sa.tuple_(batches.c.created_at, batches.c.id) < (at, after))
            rows = (await conn.scalars(
                query.order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit + 1))).all()
            return [await _live(conn, body) for body in rows[:limit]], len(rows) > limit

    async def cancel(self, owner: str, batch_id: str, now: int) -> dict | None:
        """Ask a running batch to stop (status `cancelling`; its runner ends it `cancelled`); returns
        the batch as it is now, None when there is none."""
        async with self.db.begin() as conn:
            batch = await conn.scalar(sa.select(batches.c.body).where(*_owned(owner, batch_id)))
            if batch is None:
                return None
            if batch["status"] in CANCELLABLE:
                old = batch["status"]
                batch = {**batch, "status": "cancelling", "cancelling_at": now}
                done = await conn.execute(batches.update().where(batches.c.id == batch_id, batches.c.status == old)
                                          .values(status="cancelling", body=batch))
                if done.rowcount != 1:  # its runner moved it on meanwhile: what it is now
                    batch = await conn.scalar(sa.select(batches.c.body).where(batches.c.id == batch_id))
            return await _live(conn, batch)

    # the runner ---------------------------------------------------------------------------------
    async def claim(self, runner: str, now: float, lease_s: float) -> tuple[str, dict] | None:
        """Take one active batch nobody holds (or whose holder stopped renewing): (owner, body)."""
        free = sa.or_(batches.c.lease_until.is_(None), batches.c.lease_until < now)
        async with self.db.begin() as conn:
            ids = (await conn.scalars(sa.select(batches.c.id).where(batches.c.status.in_(ACTIVE), free)
                                      .order_by(batches.c.created_at).limit(8))).all()
            for batch_id in ids:
                done = await conn.execute(batches.update().where(batches.c.id == batch_id, free)
                                          .values(runner=runner, lease_until=now + lease_s))
                if done.rowcount == 1:
                    row = (await conn.execute(sa.select(batches.c.owner, batches.c.body)
                                              .where(batches.c.id == batch_id))).one()
                    return row.owner, row.body
        return None

    async def renew(self, runner: str, batch_id: str, until: float) -> str | None:
        """Extend this runner's claim; the batch's status, None when the claim is no longer its own."""
        async with self.db.begin() as conn:
            done = await conn.execute(batches.update().where(batches.c.id == batch_id, batches.c.runner == runner)
                                      .values(lease_until=until))
            if done.rowcount != 1:
                return None
            return await conn.scalar(sa.select(batches.c.status).where(batches.c.id == batch_id))

    async def release(self, runner: str, batch_id: str) -> None:
        async with self.db.begin() as conn:
            await conn.execute(batches.update().where(batches.c.id == batch_id, batches.c.runner == runner)
                               .values(runner=None, lease_until=None))

    async def advance(self, runner: str, batch: dict, expect: tuple[str, ...]) -> bool:
        """Write `batch` (its new status) when this runner holds it and its status is one of `expect`;
        False otherwise (cancelled meanwhile, or taken over)."""
        async with self.db.begin() as conn:
            done = await conn.execute(
                batches.update()
                .where(batches.c.id == batch["id"], batches.c.runner == runner, batches.c.status.in_(expect))
                .values(status=batch["status"], body=batch))
            return done.rowcount == 1

    async def status(self, batch_id: str) -> str | None:
        async with self.db.connect() as conn:
            return await conn.scalar(sa.select(batches.c.status).where(batches.c.id == batch_id))

    async def answered(self, batch_id: str) -> set[int]:
        async with self.db.connect() as conn:
            return set((await conn.scalars(sa.select(batch_lines.c.position)
                                           .where(batch_lines.c.batch_id == batch_id))).all())

    async def record(self, batch_id: str, position: int, failed: bool, line: str) -> bool:
        """Record one answered line; False when it was answered already (then this answer is dropped)."""
        try:
            async with self.db.begin() as conn:
                await conn.execute(batch_lines.insert().values(batch_id=batch_id, position=position, failed=failed,
                                                               line=line))
            return True
        except IntegrityError:
            return False

    async def output(self, batch_id: str, failed: bool) -> list[str]:
        """The answered lines of one file (output or errors), in input order."""
        async with self.db.connect() as conn:
            return list((await conn.scalars(
                sa.select(batch_lines.c.line)
                .where(batch_lines.c.batch_id == batch_id, batch_lines.c.failed == failed)
                .order_by(batch_lines.c.position))).all())

    async def counts(self, batch_id: str) -> tuple[int, int]:
        async with self.db.connect() as conn:
            return await _counts(conn, batch_id)

    async def expire(self, conn, cutoff: float) -> int:
        old = (await conn.scalars(sa.select(batches.c.id).where(
            batches.c.created_at < cutoff, batches.c.status.not_in(ACTIVE)))).all()
        for start in range(0, len(old), 500):
            chunk = old[start:start + 500]
            await conn.execute(batch_lines.delete().where(batch_lines.c.batch_id.in_(chunk)))
            await conn.execute(batches.delete().where(batches.c.id.in_(chunk)))
        return len(old)


def _owned(owner: str, batch_id: str) -> tuple:
    return batches.c.id == batch_id, batches.c.owner == owner


async def _counts(conn, batch_id: str) -> tuple[int, int]:
    """(completed, failed) lines answered so far."""
    rows = (await conn.execute(sa.select(batch_lines.c.failed, sa.func.count())
                               .where(batch_lines.c.batch_id == batch_id).group_by(batch_lines.c.failed))).all()
    by = {bool(failed): count for failed, count in rows}
    return by.get(False, 0), by.get(True, 0)


async def _live(conn, batch: dict) -> dict:
    """A running batch's request_counts as they are now (its body has them only once it ends)."""
    if batch["status"] not in ACTIVE or batch["status"] == "validating":
        return batch
    completed, failed = await _counts(conn, batch["id"])
    return {**batch, "request_counts": {**batch["request_counts"], "completed": completed, "failed": failed}}
