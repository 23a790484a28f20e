"""app/store's Files and Batches repositories on SQLite and a real PostgreSQL server: ownership,
paging, one claim per batch (taken over once its lease lapses), lines recorded once, cancel."""

import asyncio
import time

from app.config import StoreConfig
from app.store import BatchStore, Database, FileStore


def run(url, tmp_path, body):
    async def main():
        # A retention longer than any record here: the store's own sweep at start must not race the
        # tests, which call expire() themselves with the cutoff they mean.
        db = Database(StoreConfig(url=url, files_dir=str(tmp_path / "files"), retention_days=1000))
        files, batches = FileStore(db, db.config.files_dir), BatchStore(db)
        await db.start()
        try:
            return await body(files, batches)
        finally:
            await db.close()

    return asyncio.run(main())


def batch(batch_id: str, created_at: float, status: str = "validating") -> dict:
    return {"id": batch_id, "object": "batch", "status": status, "created_at": created_at,
            "request_counts": {"total": 3, "completed": 0, "failed": 0}}


def test_files_belong_to_their_owner_and_page(url, tmp_path):
    async def body(files, _):
        made = [await files.write("a", f"{i}\n".encode(), "batch", f"f{i}.jsonl") for i in range(3)]
        await files.write("b", b"x\n", "batch", "b.jsonl")
        assert await files.get("b", made[0]["id"]) is None
        assert (await files.get("a", made[0]["id"]))["bytes"] == 2
        assert await files.read(made[1]["id"]) == b"1\n"
        page, more = await files.list("a", None, None, 2, descending=False)
        assert [f["id"] for f in page] == [m["id"] for m in made[:2]] and more
        page, more = await files.list("a", None, page[-1]["id"], 2, descending=False)
        assert [f["id"] for f in page] == [made[2]["id"]] and not more
        assert await files.list("a", "batch_output", None, 10, True) == ([], False)
        assert not await files.delete("b", made[0]["id"])
        assert await files.delete("a", made[0]["id"])
        assert await files.read(made[0]["id"]) is None and await files.get("a", made[0]["id"]) is None

    run(url, tmp_path, body)


def test_one_runner_holds_a_batch_until_its_lease_lapses(url, tmp_path):
    async def body(_, batches):
        now = time.time()
        await batches.create("a", batch("batch_1", now))
        assert (await batches.claim("r1", now, 30))[0] == "a"
        assert await batches.claim("r2", now + 1, 30) is None  # held
        assert await batches.renew("r2", "batch_1", now + 60) is None  # not r2's
        assert await batches.renew("r1", "batch_1", now + 60) == "validating"
        owner, taken = await batches.claim("r2", now + 61, 30)  # r1 stopped renewing
        assert (owner, taken["id"]) == ("a", "batch_1")
        assert not await batches.advance("r1", {**taken, "status": "in_progress"}, ("validating",))
        assert await batches.advance("r2", {**taken, "status": "in_progress"}, ("validating",))
        await batches.release("r2", "batch_1")
        assert (await batches.claim("r1", now + 62, 30))[1]["status"] == "in_progress"

    run(url, tmp_path, body)


def test_lines_are_recorded_once_and_counted(url, tmp_path):
    async def body(_, batches):
        await batches.create("a", batch("batch_1", time.time(), "in_progress"))
        assert await batches.record("batch_1", 2, False, "two")
        assert await batches.record("batch_1", 0, True, "zero")
        assert await batches.record("batch_1", 1, False, "one")
        assert not await batches.record("batch_1", 1, False, "one again")
        assert await batches.answered("batch_1") == {0, 1, 2}
        assert await batches.output("batch_1", False) == ["one", "two"]
        assert await batches.output("batch_1", True) == ["zero"]
        assert (await batches.get("a", "batch_1"))["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
        assert await batches.get("b", "batch_1") is None

    run(url, tmp_path, body)


def test_cancel_pages_and_sweep(url, tmp_path):
    async def body(_, batches):
        now = time.time()
        for i in range(3):
            await batches.create("a", batch(f"batch_{i}", now + i))
        await batches.create("a", batch("batch_done", now - 100 * 86400, "completed"))
        assert await batches.cancel("b", "batch_0", 1) is None
        assert (await batches.cancel("a", "batch_0", 1))["status"] == "cancelling"
        assert (await batches.cancel("a", "batch_done", 1))["status"] == "completed"  # ended: left as it is
        page, more = await batches.list("a", None, 2)
        assert [b["id"] for b in page] == ["batch_2", "batch_1"] and more
        page, more = await batches.list("a", "batch_1", 2)
        assert [b["id"] for b in page] == ["batch_0", "batch_done"] and not more
        assert await batches.list("b", None, 10) == ([], False)
        async with batches.db.begin() as conn:
            assert await batches.expire(conn, now - 86400) == 1  # only the ended, old one
        assert await batches.get("a", "batch_done") is None

    run(url, tmp_path, body)
