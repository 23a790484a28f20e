"""Stored Responses: the response objects, their input and output items, continued conversations
(previous_response_id chains), cancellation of background ones, and their retention. Every read and
write names the owner (the API key's id): a response of another key is as absent as a missing one."""

from __future__ import annotations

import sqlalchemy as sa

from app.store.db import Database
from app.store.schema import INPUT, OUTPUT, response_items, responses

RUNNING = ("queued", "in_progress")  # statuses a background response may still leave


class ResponseStore:
    def __init__(self, db: Database):
        self.db = db
        db.expiring.append(self)

    async def save(self, owner: str, response: dict, input_items: list[dict], output_items: list[dict]) -> None:
        """Store a new response with its items (each item has its `id`)."""
        async with self.db.begin() as conn:
            await conn.execute(responses.insert().values(
                id=response["id"], owner=owner, created_at=response["created_at"], status=response["status"],
                previous_id=response.get("previous_response_id"), body=response))
            await _insert_items(conn, response["id"], INPUT, input_items)
            await _insert_items(conn, response["id"], OUTPUT, output_items)

    async def finish(self, response: dict, output_items: list[dict]) -> bool:
        """Record the final state of a response stored while it ran; False (nothing written) when
        it no longer runs: it was cancelled or deleted meanwhile."""
        async with self.db.begin() as conn:
            done = await conn.execute(
                responses.update()
                .where(responses.c.id == response["id"], responses.c.status.in_(RUNNING))
                .values(status=response["status"], body=response))
            if done.rowcount != 1:
                return False
            await _insert_items(conn, response["id"], OUTPUT, output_items)
            return True

    async def set_status(self, response: dict) -> bool:
        """A running response's new status (queued -> in_progress); False when it no longer runs."""
        return await self.finish(response, [])

    async def get(self, owner: str, response_id: str) -> dict | None:
        async with self.db.connect() as conn:
            return await conn.scalar(sa.select(responses.c.body).where(*_owned(owner, response_id)))

    async def status(self, response_id: str) -> str | None:
        async with self.db.connect() as conn:
            return await conn.scalar(sa.select(responses.c.status).where(responses.c.id == response_id))

    async def cancel(self, owner: str, response_id: str, cancelled: dict) -> dict | None:
        """Mark a running response cancelled (its body becomes `cancelled`); returns the body it has
        now (`cancelled`, or its own when it had already ended), None when there is none."""
        async with self.db.begin() as conn:
            done = await conn.execute(
                responses.update()
                .where(*_owned(owner, response_id), responses.c.status.in_(RUNNING))
                .values(status="cancelled", body=cancelled))
            if done.rowcount == 1:
                return cancelled
            return await conn.scalar(sa.select(responses.c.body).where(*_owned(owner, response_id)))

    async def delete(self, owner: str, response_id: str) -> bool:
        async with self.db.begin() as conn:
            owned = await conn.scalar(sa.select(responses.c.id).where(*_owned(owner, response_id)))
            if owned is None:
                return False
            await _delete(conn, [response_id])
            return True

    async def input_items(self, owner: str, response_id: str, after: str | None, limit: int,
                          descending: bool) -> tuple[list[dict], bool] | None:
        """(a page of the response's input items, whether more follow), or None when there is no such
        response; `after`: the id of the item the page starts after (KeyError when it has none)."""
        async with self.db.connect() as conn:
            if await conn.scalar(sa.select(responses.c.id).where(*_owned(owner, response_id))) is None:
                return None
            mine = (response_items.c.response_id == response_id, response_items.c.kind == INPUT)
            query = sa.select(response_items.c.body).where(*mine)
            if after is not None:
                at = await conn.scalar(sa.select(response_items.c.position)
                                       .where(*mine, response_items.c.item_id == after))
                if at is None:
                    raise KeyError(after)
                query = query.where(response_items.c.position < at if descending else response_items.c.position > at)
            order = response_items.c.position.desc() if descending else response_items.c.position
            rows = (await conn.scalars(query.order_by(order).limit(limit + 1))).all()
            return list(rows[:limit]), len(rows) > limit

    async def conversation(self, owner: str, response_id: str) -> tuple[dict, list[dict]] | None:
        """(the response, every item of its conversation: each response of the previous_response_id
        chain ending at it, oldest first, its input then its output), or None when it is not stored."""
        async with self.db.connect() as conn:
            response = await conn.scalar(sa.select(responses.c.body).where(*_owned(owner, response_id)))
            if response is None:
                return None
            chain = (sa.select(responses.c.id, responses.c.previous_id, sa.literal(0).label("depth"))
                     .where(*_owned(owner, response_id)).cte("chain", recursive=True))
            chain = chain.union_all(
                sa.select(responses.c.id, responses.c.previous_id, chain.c.depth + 1)
                .where(responses.c.id == chain.c.previous_id, responses.c.owner == owner))
            items = await conn.scalars(
                sa.select(response_items.c.body)
                .join(chain, response_items.c.response_id == chain.c.id)
                .order_by(chain.c.depth.desc(), response_items.c.kind, response_items.c.position))
            return response, list(items)

    async def expire(self, conn, cutoff: float) -> int:
        old = (await conn.scalars(sa.select(responses.c.id).where(responses.c.created_at < cutoff))).all()
        await _delete(conn, old)
        return len(old)


def _owned(owner: str, response_id: str) -> tuple:
    return responses.c.id == response_id, responses.c.owner == owner


async def _insert_items(conn, response_id: str, kind: int, items: list[dict]) -> None:
    if items:
        await conn.execute(response_items.insert(), [
            {"response_id": response_id, "kind": kind, "position": i, "item_id": item["id"], "body": item}
            for i, item in enumerate(items)])


async def _delete(conn, ids: list[str]) -> None:
    # the items first: foreign keys hold without relying on the database's ON DELETE CASCADE
    for start in range(0, len(ids), 500):  # bounded IN lists
        chunk = ids[start:start + 500]
        await conn.execute(response_items.delete().where(response_items.c.response_id.in_(chunk)))
        await conn.execute(responses.delete().where(responses.c.id.in_(chunk)))
