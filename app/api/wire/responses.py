"""OpenAI's Responses API: `POST /v1/responses` (whole, streamed, or in the background), and the
stored responses' routes: retrieve, delete, cancel, input items. Requests are checked and translated
in responses_request.py and responses_items.py; the output and its stream events are built in
responses_stream.py; stored responses live in app/store/ and belong to the API key that made them
(another key's id is a 404, as a missing one)."""

from __future__ import annotations

import copy
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.adapter import Adapter, adapter, request_id
from app.api.errors import ConduitError, invalid, stream_failure
from app.api.pipeline import Pipeline
from app.api.wire.openai import error_body, list_page
from app.api.wire.responses_background import BackgroundRuns, detach
from app.api.wire.responses_items import input_items, new_id, to_messages
from app.api.wire.responses_request import LOGPROBS_INCLUDE, FunctionTool, ResponsesRequest
from app.api.wire.responses_stream import ResponseOutput
from app.config import AppConfig
from app.limits import current_call
from app.store import Database, ResponseStore
from app.store.responses import RUNNING

log = logging.getLogger("ray.serve")
PREFIX = "/v1/responses"


def not_found(response_id: str) -> ConduitError:
    return ConduitError(f"Response with id '{response_id}' not found.", 404, "invalid_request_error", None, "not_found")


def new_response(body: ResponsesRequest, tools: list[FunctionTool], status: str) -> dict:
    return {"id": new_id("resp"), "object": "response", "created_at": int(time.time()), "status": status,
            "background": bool(body.background), "completed_at": None, "error": None, "incomplete_details": None,
            **body.wire_fields(tools), "output": [], "usage": None}


def sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


@adapter
def routes(pipeline: Pipeline, config: AppConfig) -> Adapter:
    db = Database(config.store)
    store = ResponseStore(db)
    background = BackgroundRuns(pipeline, store)
    max_items = config.ingress.input_limits.max_messages

    @asynccontextmanager
    async def lifespan(_app):
        await db.start()
        try:
            yield
        finally:
            await background.stop()
            await db.close()

    router = APIRouter(lifespan=lifespan)

    @router.post(PREFIX)
    async def create(request: Request, body: ResponsesRequest):
        body.check()
        owner = current_call.get().tenant
        tools = body.function_tools()
        history = await _history(store, owner, body.previous_response_id)
        items = input_items(body.input)
        if not history and not items:
            raise invalid("input must not be empty", "input")
        if len(history) + len(items) > max_items:
            raise invalid(f"input: at most {max_items} items in a conversation (previous responses' included), "
                          f"got {len(history) + len(items)}", "input")
        req = body.to_internal(request_id(request), to_messages(history + items, body.instructions), tools)
        if body.background:
            return await background.start(owner, new_response(body, tools, "queued"), items, req)
        response = new_response(body, tools, "in_progress")
        output = ResponseOutput(response, req, obfuscate=not body.stream_options or body.stream_options.include_obfuscation)
        if not body.stream:
            (out,) = await pipeline.complete(req)
            output.feed(out)
            if body.stored:
                await store.save(owner, response, items, response["output"])
            return response
        stream = await pipeline.stream(req)  # errors before the first token still get a status code
        if body.stored:
            await store.save(owner, copy.deepcopy(response), items, [])
        return StreamingResponse(_events(output, stream, store if body.stored else None),
                                 media_type="text/event-stream")

    @router.get(PREFIX + "/{response_id}")
    async def retrieve(response_id: str, include: Annotated[list[str] | None, Query()] = None,
                       stream: bool = False):
        if stream:
            raise invalid("streaming a stored response again is not supported by this server", "stream",
                          "unsupported_parameter")
        for item in include or []:
            if item != LOGPROBS_INCLUDE:
                raise invalid(f"include: {item!r} is not supported by this server", "include", "unsupported_parameter")
        response = await store.get(current_call.get().tenant, response_id)
        if response is None:
            raise not_found(response_id)
        return response

    @router.delete(PREFIX + "/{response_id}")
    async def delete(response_id: str):
        owner = current_call.get().tenant
        background.cancel_local(response_id)
        if not await store.delete(owner, response_id):
            raise not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @router.post(PREFIX + "/{response_id}/cancel")
    async def cancel(response_id: str):
        owner = current_call.get().tenant
        response = await store.get(owner, response_id)
        if response is None:
            raise not_found(response_id)
        if not response.get("background"):
            raise invalid("Only responses created with background=true can be cancelled.", "response_id")
        response = await store.cancel(owner, response_id, {**response, "status": "cancelled"})
        if response is None:
            raise not_found(response_id)
        if response["status"] != "cancelled":
            raise invalid(f"Cannot cancel a response whose status is {response['status']}.", "response_id")
        background.cancel_local(response_id)
        return response

    @router.get(PREFIX + "/{response_id}/input_items")
    async def list_input_items(response_id: str, after: str | None = None,
                               limit: Annotated[int, Query(ge=1, le=100)] = 20,
                               order: Literal["asc", "desc"] = "desc",
                               include: Annotated[list[str] | None, Query()] = None):
        if include:
            raise invalid("include is not supported on input items by this server", "include", "unsupported_parameter")
        try:
            page = await store.input_items(current_call.get().tenant, response_id, after, limit, order == "desc")
        except KeyError:
            raise invalid(f"after: no input item with id '{after}' in response '{response_id}'", "after") from None
        if page is None:
            raise not_found(response_id)
        items, more = page
        return list_page(items, more)

    return Adapter(router, lambda err: JSONResponse(error_body(err), status_code=err.status), prefixes=(PREFIX,))


async def _history(store: ResponseStore, owner: str, previous_id: str | None) -> list[dict]:
    """The items of the conversation a request continues (none without previous_response_id)."""
    if previous_id is None:
        return []
    found = await store.conversation(owner, previous_id)
    if found is None:
        raise ConduitError(f"Previous response with id '{previous_id}' not found.", 404, "invalid_request_error",
                           "previous_response_id", "previous_response_not_found")
    previous, items = found
    if previous["status"] in RUNNING:
        raise invalid(f"Previous response '{previous_id}' is still {previous['status']}; continue from it once it "
                      "has ended.", "previous_response_id")
    return items


async def _events(output: ResponseOutput, stream, store: ResponseStore | None):
    """The SSE stream of one response; a stored one is written when it ends, however it ends."""
    try:
        for event in output.start():
            yield sse(event)
        async for _, out in stream:
            for event in output.feed(out):
                yield sse(event)
    except Exception as e:  # after the 200: report in the stream, never cut silently
        for event in output.fail(stream_failure(e)):
            yield sse(event)
    finally:
        await stream.aclose()
        if store is not None:
            if output.response["status"] in RUNNING:  # the client went away before the end
                output.response["status"] = "cancelled"
            detach(store.finish(output.response, output.response["output"]))
