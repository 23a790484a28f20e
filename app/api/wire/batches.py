"""OpenAI's Batch API routes (`/v1/batches`): create, retrieve, list, cancel. Served by the files
adapter (files.py), on its store; the batches run in batches_runner.py. Batches belong to the API
key that made them, and read only that key's files."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from app.api.errors import ConduitError, invalid
from app.api.wire.batches_lines import ENDPOINTS
from app.api.wire.openai import list_page
from app.limits import current_call
from app.store import BatchStore, FileStore

PREFIX = "/v1/batches"
WINDOW_S = {"24h": 24 * 3600}


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str
    completion_window: Literal["24h"]
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)


def batch_not_found(batch_id: str) -> ConduitError:
    return ConduitError(f"No batch found with id '{batch_id}'.", 404, "invalid_request_error", "id", "not_found")


def new_batch(body: BatchRequest) -> dict:
    now = int(time.time())
    return {"id": "batch_" + uuid.uuid4().hex, "object": "batch", "endpoint": body.endpoint, "errors": None,
            "input_file_id": body.input_file_id, "completion_window": body.completion_window,
            "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": None, "expires_at": now + WINDOW_S[body.completion_window], "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.metadata}


def batch_routes(batches: BatchStore, files: FileStore, runner) -> APIRouter:
    router = APIRouter()

    @router.post(PREFIX)
    async def create(body: BatchRequest):
        owner = current_call.get().tenant
        if body.endpoint not in ENDPOINTS:
            raise invalid(f"endpoint: {body.endpoint!r} is not supported; use one of {', '.join(ENDPOINTS)}",
                          "endpoint", "invalid_endpoint")
        source = await files.get(owner, body.input_file_id)
        if source is None:
            raise ConduitError(f"No such File object: {body.input_file_id}", 404, "invalid_request_error",
                               "input_file_id", "not_found")
        if source["purpose"] != "batch":
            raise invalid(f"input_file_id: file {body.input_file_id} has purpose {source['purpose']!r}; a batch "
                          "reads a file uploaded with purpose 'batch'", "input_file_id", "invalid_file_purpose")
        batch = new_batch(body)
        await batches.create(owner, batch)
        runner.wake()
        return batch

    @router.get(PREFIX)
    async def list_batches(after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20):
        try:
            data, more = await batches.list(current_call.get().tenant, after, limit)
        except KeyError:
            raise invalid(f"after: no batch with id '{after}'", "after") from None
        return list_page(data, more)

    @router.get(PREFIX + "/{batch_id}")
    async def retrieve(batch_id: str):
        batch = await batches.get(current_call.get().tenant, batch_id)
        if batch is None:
            raise batch_not_found(batch_id)
        return batch

    @router.post(PREFIX + "/{batch_id}/cancel")
    async def cancel(batch_id: str):
        batch = await batches.cancel(current_call.get().tenant, batch_id, int(time.time()))
        if batch is None:
            raise batch_not_found(batch_id)
        if batch["status"] not in ("cancelling", "cancelled"):
            raise ConduitError(f"Cannot cancel a batch whose status is {batch['status']}.", 409,
                               "invalid_request_error", None, "batch_not_cancellable")
        return batch

    return router
