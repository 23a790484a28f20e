"""Files (OpenAI's Files API): each file's record in the database, its bytes under its id in
StoreConfig.files_dir: a local directory (a plain path, taken from the project's root) or any fsspec
URL (s3://bucket/prefix, gs://..., file:///shared/nfs/files, memory://... in tests), so that ingress
replicas on several nodes share them. Every read and write names the owner (the API key's id): a file
of another key is as absent as a missing one. A file exists once its row does: its bytes are written
first, so a row never names bytes that are not all there."""

from __future__ import annotations

import time
import uuid
from asyncio import to_thread
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec
import sqlalchemy as sa
from fsspec.implementations.local import LocalFileSystem

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


def files_url(files_dir: str) -> str:
    """`files_dir` as fsspec reads it: a plain relative path is the project root's, as `make run`
    creates data/ there; a URL is left as it is."""
    if fsspec.core.split_protocol(files_dir)[0] is not None:
        return files_dir
    path = Path(files_dir)
    return str(path if path.is_absolute() else PROJECT_ROOT / path)


@dataclass(frozen=True)
class Staged:
    """An upload being written: the id it will have and where its bytes go until `add`."""

    file_id: str
    key: str


class FileStore:
    def __init__(self, db: Database, files_dir: str):
        self.db = db
        self.fs, self.root = fsspec.core.url_to_fs(files_url(files_dir))
        # a local directory stages an upload beside it and renames it in place (atomic); an object
        # store has no rename, and writes the final key at once (a PUT is atomic there)
        self.local = isinstance(self.fs, LocalFileSystem)
        db.expiring.append(self)

    def key(self, file_id: str) -> str:
        return f"{self.root.rstrip('/')}/{file_id}"

    def stage(self) -> Staged:
        """Where to write a new file's bytes (with `open_staged`) before `add` makes it a file."""
        file_id = new_file_id()
        if not self.local:
            return Staged(file_id, self.key(file_id))
        self.fs.makedirs(self.root, exist_ok=True)
        return Staged(file_id, self.key(f".upload-{uuid.uuid4().hex}"))

    def open_staged(self, staged: Staged):
        """A binary file to write the upload to (blocking: call it and its methods off the event loop)."""
        return self.fs.open(staged.key, "wb")

    async def discard(self, staged: Staged) -> None:
        """Drop the bytes of an upload that did not become a file (refused, or failed on the way),
        wherever they got to. Never after `add` returned: they are the file's then."""
        await to_thread(self._remove, list({staged.key, self.key(staged.file_id)}))

    async def add(self, owner: str, staged: Staged, purpose: str, filename: str) -> dict:
        """Make the bytes written to `staged` a file of `owner`; returns its wire object."""
        final = self.key(staged.file_id)
        if staged.key != final:
            await to_thread(self.fs.mv, staged.key, final)
        row = {"id": staged.file_id, "owner": owner, "created_at": time.time(), "purpose": purpose,
               "filename": filename, "bytes": await to_thread(self.fs.size, final)}
        async with self.db.begin() as conn:
            await conn.execute(files.insert().values(**row))
        return wire(row)

    async def write(self, owner: str, data: bytes, purpose: str, filename: str) -> dict:
        staged = self.stage()
        try:
            await to_thread(self.fs.pipe_file, staged.key, data)
            return await self.add(owner, staged, purpose, filename)
        except BaseException:
            await self.discard(staged)
            raise

    def open(self, file_id: str) -> tuple[int, IO[bytes]]:
        """(size, a binary file to read) of a file's bytes; FileNotFoundError when they are gone.
        Blocking: call it and the file's methods off the event loop."""
        key = self.key(file_id)
        return self.fs.size(key), self.fs.open(key, "rb")

    async def read(self, file_id: str) -> bytes | None:
        """A file's bytes, whole; None when they are gone."""
        try:
            return await to_thread(self.fs.cat_file, self.key(file_id))
        except FileNotFoundError:
            return None

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
        await to_thread(self._remove, [self.key(file_id)])
        return True

    async def expire(self, conn, cutoff: float) -> int:
        old = (await conn.scalars(sa.select(files.c.id).where(files.c.created_at < cutoff))).all()
        for start in range(0, len(old), 500):
            await conn.execute(files.delete().where(files.c.id.in_(old[start:start + 500])))
        await to_thread(self._remove, [self.key(file_id) for file_id in old])
        return len(old)

    def _remove(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.fs.rm_file(key)
            except FileNotFoundError:
                pass  # never written, or removed already


def _owned(owner: str, file_id: str) -> tuple:
    return files.c.id == file_id, files.c.owner == owner
