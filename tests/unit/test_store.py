"""app/store against the two backends it is built for: embedded SQLite and a real PostgreSQL server
(started here, tests/pg_server.py). Migrations (fresh, repeated, concurrent), records surviving a
restart, ownership, conversation chains, paging, cancellation and the retention sweep."""

import asyncio
import time

import pytest
import sqlalchemy as sa

from app.config import StoreConfig
from app.store import Database, ResponseStore
from app.store.db import async_url, current_revision


def run(url: str, body, **config):
    """`body(db, store)` against a started Database at `url`."""
    async def main():
        db = Database(StoreConfig(url=url, **config))
        store = ResponseStore(db)
        await db.start()
        try:
            return await body(db, store)
        finally:
            await db.close()

    return asyncio.run(main())


def response(rid: str, status: str = "completed", previous: str | None = None, created_at: float | None = None):
    return {"id": rid, "object": "response", "status": status, "created_at": created_at or time.time(),
            "previous_response_id": previous, "output": []}


def message(item_id: str, role: str, text: str) -> dict:
    return {"id": item_id, "type": "message", "role": role, "content": [{"type": "input_text", "text": text}]}


def test_migrates_once_and_keeps_records_across_restarts(url):
    async def first(db, store):
        async with db.connect() as conn:
            assert await current_revision(conn) == "0002"
        await store.save("key-a", response("resp_1"), [message("msg_1", "user", "héllo\x00 ☃ 𝄞")], [])

    async def second(db, store):  # a new process: migrating again changes nothing, the record is there
        await db.migrate()
        assert (await store.get("key-a", "resp_1"))["id"] == "resp_1"
        assert (await store.input_items("key-a", "resp_1", None, 10, False))[0][0]["content"][0]["text"] == "héllo\x00 ☃ 𝄞"

    run(url, first)
    run(url, second)


def test_concurrent_starts_migrate_once(url):
    async def main():
        dbs = [Database(StoreConfig(url=url)) for _ in range(4)]
        await asyncio.gather(*(db.start() for db in dbs))  # replicas starting together
        for db in dbs:
            await db.close()

    asyncio.run(main())

    async def check(db, store):
        async with db.connect() as conn:
            assert await current_revision(conn) == "0002"

    run(url, check)


def test_another_owner_sees_nothing(url):
    async def body(db, store):
        await store.save("key-a", response("resp_a"), [message("msg_1", "user", "hi")], [])
        assert await store.get("key-b", "resp_a") is None
        assert await store.conversation("key-b", "resp_a") is None
        assert await store.input_items("key-b", "resp_a", None, 10, True) is None
        assert not await store.delete("key-b", "resp_a")
        assert await store.cancel("key-b", "resp_a", response("resp_a", "cancelled")) is None
        assert (await store.get("key-a", "resp_a"))["id"] == "resp_a"

    run(url, body)


def test_conversation_is_the_chain_oldest_first(url):
    async def body(db, store):
        previous = None
        for turn in range(3):
            rid = f"resp_{turn}"
            await store.save("k", response(rid, previous=previous), [message(f"in_{turn}", "user", f"q{turn}")],
                             [message(f"out_{turn}", "assistant", f"a{turn}")])
            previous = rid
        await store.save("k", response("resp_other"), [message("in_x", "user", "unrelated")], [])
        found, items = await store.conversation("k", "resp_2")
        assert found["id"] == "resp_2"
        assert [i["id"] for i in items] == ["in_0", "out_0", "in_1", "out_1", "in_2", "out_2"]
        _, items = await store.conversation("k", "resp_1")
        assert [i["id"] for i in items] == ["in_0", "out_0", "in_1", "out_1"]

    run(url, body)


def test_input_items_pages(url):
    async def body(db, store):
        items = [message(f"msg_{i}", "user", str(i)) for i in range(7)]
        await store.save("k", response("resp_p"), items, [message("out", "assistant", "x")])
        page, more = await store.input_items("k", "resp_p", None, 3, True)
        assert [i["id"] for i in page] == ["msg_6", "msg_5", "msg_4"] and more
        page, more = await store.input_items("k", "resp_p", "msg_4", 3, True)
        assert [i["id"] for i in page] == ["msg_3", "msg_2", "msg_1"] and more
        page, more = await store.input_items("k", "resp_p", "msg_1", 3, True)
        assert [i["id"] for i in page] == ["msg_0"] and not more
        page, more = await store.input_items("k", "resp_p", "msg_2", 10, False)
        assert [i["id"] for i in page] == ["msg_3", "msg_4", "msg_5", "msg_6"] and not more
        with pytest.raises(KeyError):
            await store.input_items("k", "resp_p", "out", 3, True)  # an output item is not an input item

    run(url, body)


def test_delete_removes_the_response_and_its_items(url):
    async def body(db, store):
        await store.save("k", response("resp_d"), [message("msg_d", "user", "x")], [message("o", "assistant", "y")])
        assert await store.delete("k", "resp_d")
        assert await store.get("k", "resp_d") is None
        assert not await store.delete("k", "resp_d")
        async with db.connect() as conn:
            assert await conn.scalar(sa.text("SELECT count(*) FROM response_items")) == 0

    run(url, body)


def test_cancel_wins_over_a_later_finish(url):
    async def body(db, store):
        await store.save("k", response("resp_bg", "queued"), [message("m", "user", "x")], [])
        assert await store.set_status(response("resp_bg", "in_progress"))
        assert (await store.cancel("k", "resp_bg", response("resp_bg", "cancelled")))["status"] == "cancelled"
        assert await store.status("resp_bg") == "cancelled"
        assert not await store.finish(response("resp_bg", "completed"), [message("o", "assistant", "late")])
        assert (await store.get("k", "resp_bg"))["status"] == "cancelled"
        # an ended response is not cancelled again: its own body comes back
        await store.save("k", response("resp_done"), [], [])
        assert (await store.cancel("k", "resp_done", response("resp_done", "cancelled")))["status"] == "completed"

    run(url, body)


def test_sweep_deletes_only_what_is_past_retention(url):
    async def body(db, store):
        # Sweep as of 10 days ahead: nothing here is past retention yet, so the store's own sweep at
        # start (which may run between these saves) deletes nothing this test means to count.
        now = time.time() + 10 * 86400
        await store.save("k", response("resp_old", created_at=now - 31 * 86400), [message("m1", "user", "x")], [])
        await store.save("k", response("resp_new", created_at=now - 29 * 86400), [message("m2", "user", "x")], [])
        assert await db.sweep(now) == 1
        assert await store.get("k", "resp_old") is None
        assert await store.get("k", "resp_new") is not None

    run(url, body, retention_days=30)


def test_sweep_runs_by_itself(url):
    async def body(db, store):
        await store.save("k", response("resp_old", created_at=time.time() - 2 * 86400), [], [])
        for _ in range(50):
            if await store.get("k", "resp_old") is None:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the periodic sweep did not delete the expired response")

    run(url, body, retention_days=1, sweep_interval_s=0.2)


def test_relative_sqlite_paths_are_under_the_project():
    from app.config import PROJECT_ROOT

    assert async_url("sqlite:///data/conduit.db").database == str(PROJECT_ROOT / "data" / "conduit.db")
    assert async_url("sqlite:///data/conduit.db").drivername == "sqlite+aiosqlite"
    assert async_url("postgresql://u@h/db").drivername == "postgresql+asyncpg"
    assert async_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
