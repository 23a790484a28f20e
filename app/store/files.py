"""Files (OpenAI's Files API): each file's record in the database, its bytes in a directory
(StoreConfig.files_dir) under its id. Every read and write names the owner (the API key's id): a
file of another key is as absent as a missing one."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from app.config import PROJECT_ROOT
from app.store.db import Database
from app.store.schema import files


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


def wire(row) -> dict:
    """OpenAI's file object, from a row's mapping."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": int(row["created_at"]),
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


class FileStore:
    def __init__(self, db: Database, files_dir: str):
        self.db = db
        path = Path(files_dir)
        self.dir = path if path.is_absolute() else PROJECT_ROOT / path
        db.expiring.append(self)

    def path(self, file_id: str) -> Path:
        return self.dir / file_id

    def staging(self) -> Path:
        """A fresh path to write an upload to before `add` makes it a file (renamed in place)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / f".upload-{uuid.uuid4().hex}"

    async def add(self, owner: str, staged: Path, purpose: str, filename: str) -> dict:
        """Make the bytes at `staged` a file of `owner`; returns its wire object."""
        file_id = new_file_id()
        os.replace(staged, self.path(file_id))
        row = {"id": file_id, "owner": owner, "created_at": time.time(), "purpose": purpose,
               "filename": filename, "bytes": self.path(file_id).stat().st_size}
        async with self.db.begin() as conn:
            await conn.execute(files.insert().values(**row))
        return wire(row)

    async def write(self, owner: str, data: bytes, purpose: str, filename: str) -> dict:
        staged = self.staging()
        await asyncio.to_thread(staged.write_bytes, data)
        return await self.add(owner, staged, purpose, filename)

    async def get(self, owner: str, file_id: str) -> dict | None:
        async with self.db.connect() as conn:
            row = (await conn.execute(sa.select(files).where(*_owned(owner, file_id)))).first()
        return None if row is None else wire(row._mapping)

    async def list(self, owner: str, purpose: str | None, after: str | None, limit: int,
                   descending: bool) -> tuple[list[dict], bool]:
        """(a page of the owner's files, whether more follow); `after`: the id the page starts after
        (KeyError when the owner has no such file)."""
        async with self.db.connect() as conn:
            query = sa.select(files).where(files.c.owner == owner)
            if purpose is not None:
                query = query.where(files.c.purpose == purpose)
            if after is not None:
                at = await conn.scalar(sa.select(files.c.created_at).where(*_owned(owner, after)))
                if at is None:
                    raise KeyError(after)
                key = sa.tuple_(files.c.created_at, files.c.id)
                query = query.where(key < (at, after) if descending else key > (at, after))
            order = (files.c.created_at.desc(), files.c.id.desc()) if descending else (files.c.created_at, files.c.id)
            rows = (await conn.execute(query.order_by(*order).limit(limit + 1))).all()
        return [wire(row._mapping) for row in rows[:limit]], len(rows) > limit

    async def delete(self, owner: str, file_id: str) -> bool:
        async with self.db.begin() as conn:
            done = await conn.execute(files.delete().where(*_owned(owner, file_id)))
        if done.rowcount != 1:
            return False
        self.path(file_id).unlink(missing_ok=True)
        return True

    async def expire(self, conn, cutoff: float) -> int:
        old = (await conn.scalars(sa.select(files.c.id).where(files.c.created_at < cutoff))).all()
        for start in range(0, len(old), 500):
            await conn.execute(files.delete().where(files.c.id.in_(old[start:start + 500])))
        for file_id in old:
            self.path(file_id).unlink(missing_ok=True)
        return len(old)


def _owned(owner: str, file_id: str) -> tuple:
    return files.c.id == file_id, files.c.owner == owner
