"""OpenAI's Files API (`/v1/files`), and the adapter that also serves the Batch API (batches.py) on
the same store: file records in the database, their bytes in StoreConfig.files_dir (a directory or
any fsspec URL; app/store/files.py). A `batch` file must be JSONL (each non-blank line a JSON
object), checked as it streams in; files belong to the API key that uploaded them (another key's id
is a 404, as a missing one). Content streams out in chunks, never whole in memory. Uploads are bounded by store.max_file_bytes
(the server's body limit for this one path; ingress.max_request_bytes bounds every other body)."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.adapter import Adapter, adapter
from app.api.errors import ConduitError, invalid
from app.api.pipeline import Pipeline
from app.api.wire.batches import batch_routes
from app.api.wire.batches_runner import BatchRunner
from app.api.wire.openai import error_body, list_page
from app.config import AppConfig
from app.limits import current_call
from app.store import BatchStore, Database, FileStore

PREFIX = "/v1/files"
PURPOSES = ("batch",)  # what may be uploaded; `batch_output` files are made by batches
CHUNK = 1 << 20


def file_not_found(file_id: str) -> ConduitError:
    return ConduitError(f"No such File object: {file_id}", 404, "invalid_request_error", "id", "not_found")


@adapter
def routes(pipeline: Pipeline, config: AppConfig) -> Adapter:
    db = Database(config.store)
    files = FileStore(db, config.store.files_dir)
    batches = BatchStore(db)
    runner = BatchRunner(pipeline, batches, files, config.store)
    max_bytes = config.store.max_file_bytes

    @asynccontextmanager
    async def lifespan(_app):
        await db.start()
        runner.start()
        try:
            yield
        finally:
            await runner.stop()
            await db.close()

    router = APIRouter(lifespan=lifespan)

    @router.post(PREFIX)
    async def upload(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]):
        if purpose not in PURPOSES:
            raise invalid(f"purpose: {purpose!r} is not supported by this server; use one of {', '.join(PURPOSES)}",
                          "purpose")
        staged = files.stage()
        try:
            await _stage(file, await asyncio.to_thread(files.open_staged, staged), max_bytes)
            return await files.add(current_call.get().tenant, staged, purpose, _filename(file.filename))
        except BaseException:
            await asyncio.shield(files.discard(staged))
            raise

    @router.get(PREFIX)
    async def list_files(purpose: str | None = None, after: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                         order: Literal["asc", "desc"] = "desc"):
        try:
            data, more = await files.list(current_call.get().tenant, purpose, after, limit, order == "desc")
        except KeyError:
            raise invalid(f"after: no file with id '{after}'", "after") from None
        return list_page(data, more)

    @router.get(PREFIX + "/{file_id}")
    async def retrieve(file_id: str):
        found = await files.get(current_call.get().tenant, file_id)
        if found is None:
            raise file_not_found(file_id)
        return found

    @router.get(PREFIX + "/{file_id}/content")
    async def content(file_id: str):
        if await files.get(current_call.get().tenant, file_id) is None:
            raise file_not_found(file_id)
        try:
            size, source = await asyncio.to_thread(files.open, file_id)
        except FileNotFoundError:  # the record outlived its bytes (removed by hand, or a sweep racing)
            raise file_not_found(file_id) from None
        return StreamingResponse(_chunks(source), media_type="application/octet-stream",
                                 headers={"content-length": str(size)})

    @router.delete(PREFIX + "/{file_id}")
    async def delete(file_id: str):
        if not await files.delete(current_call.get().tenant, file_id):
            raise file_not_found(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    router.include_router(batch_routes(batches, files, runner))
    return Adapter(router, lambda err: JSONResponse(error_body(err), status_code=err.status),
                   prefixes=(PREFIX, "/v1/batches"))


async def _stage(upload: UploadFile, out, max_bytes: int) -> None:
    """Write the upload to `out` (closed at the end), refusing it past `max_bytes`, empty, or not JSONL."""
    size, check = 0, JsonlCheck()

    def take(chunk: bytes) -> None:
        check.feed(chunk)
        out.write(chunk)

    try:
        while chunk := await upload.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise ConduitError(f"File exceeds the limit of {max_bytes} bytes", 413, param="file",
                                   code="file_too_large")
            await asyncio.to_thread(take, chunk)
        if size == 0:
            raise invalid("file: the file is empty", "file")
        check.end()
    finally:
        await asyncio.to_thread(out.close)


async def _chunks(source):
    """The bytes of an open file, CHUNK at a time, read off the event loop; closes it at the end."""
    try:
        while chunk := await asyncio.to_thread(source.read, CHUNK):
            yield chunk
    finally:
        # not awaited: once the client is gone every await here is cancelled (closing a read is cheap)
        source.close()


def _filename(name: str | None) -> str:
    """The name as stored: no NUL (PostgreSQL's text refuses it), at most 255 characters."""
    return (name or "").replace("\x00", "")[:255] or "file.jsonl"


class JsonlCheck:
    """A batch file is JSONL: each non-blank line UTF-8 text holding one JSON object. Fed the file's
    chunks as they arrive, so an upload is read once, wherever its bytes go."""

    def __init__(self):
        self.number = 0  # lines checked
        self.pending: list[bytes] = []  # the line so far, when a chunk ends inside one

    def feed(self, chunk: bytes) -> None:
        *complete, rest = chunk.split(b"\n")
        if complete:
            self._line(b"".join([*self.pending, complete[0]]))
            for raw in complete[1:]:
                self._line(raw)
            self.pending = []
        if rest:
            self.pending.append(rest)

    def end(self) -> None:
        if self.pending:
            self._line(b"".join(self.pending))

    def _line(self, raw: bytes) -> None:
        self.number += 1
        if not raw.strip():
            return
        try:
            ok = isinstance(json.loads(raw.decode()), dict)
        except (ValueError, RecursionError):
            ok = False
        if not ok:
            raise invalid(f"file: line {self.number} is not a JSON object; a batch file is JSONL (one JSON object "
                          "per line)", "file", "invalid_file_format")
