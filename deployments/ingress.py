"""Ingress deployment: the one HTTP entry. Parses a wire format into the internal request, asks
the tokenizer deployment to prepare it, and streams the model replica's deltas back.

Path of one request: proxy -> Ingress (this) -> Tokenizer.prepare (one hop) -> Model.generate
(one streaming call, picked by deployments/router.py inside this process) -> deltas back here."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.api import openai
from app.api.errors import ConduitError
from app.api.protocol import GenerateRequest, PreparedRequest
from app.config import AppConfig, IngressConfig
from app.engine.engine import RequestOutput
from deployments.router import ModelTable

log = logging.getLogger("ray.serve")
api = FastAPI(title="Conduit", description="OpenAI-compatible LLM inference on Ray Serve")


def _validation_error(exc: RequestValidationError) -> ConduitError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return ConduitError(f"We could not parse the JSON body of your request: {err.get('msg')}", param=None)
    if err.get("type") == "extra_forbidden":
        return ConduitError(f"Unrecognized request argument supplied: {param}", param=param, code="unsupported_parameter")
    return ConduitError(f"Invalid value for '{param}': {err.get('msg')}", param=param)


@api.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError):
    err = _validation_error(exc)
    return JSONResponse(openai.error_body(err), status_code=err.status)


@api.exception_handler(ConduitError)
async def _on_conduit_error(request: Request, exc: ConduitError):
    return JSONResponse(openai.error_body(exc), status_code=exc.status)


class _Limits:
    max_request_bytes = IngressConfig().max_request_bytes  # replaced from the config by Ingress.__init__


@api.middleware("http")
async def _limit_body_size(request: Request, call_next):
    # module-level, so it reads this module's _Limits in the replica (the app is pickled by reference)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > _Limits.max_request_bytes):
        err = ConduitError(
            f"Request body of {length} bytes exceeds the limit of {_Limits.max_request_bytes} bytes",
            413, code="request_too_large",
        )
        return JSONResponse(openai.error_body(err), status_code=413)
    return await call_next(request)



async def _interleave(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Merge the choices' streams as their deltas arrive, tagged with the choice index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((index, out))
        except Exception as e:
            await queue.put(e)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            remaining -= item[1].finished
            yield item
    finally:
        for task in tasks:
            task.cancel()

# helpers above: serve.ingress freezes the class when it is defined

@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=512)
@serve.ingress(api)
class Ingress:
    def __init__(self, config: AppConfig, tokenizer: DeploymentHandle, models: dict[str, DeploymentHandle]):
        self.config = config
        _Limits.max_request_bytes = config.ingress.max_request_bytes
        self.tokenizer = tokenizer
        self.models = ModelTable({m.name: m.aliases for m in config.models}, models)

    # pipeline -----------------------------------------------------------------------------------
    async def _prepare(self, req: GenerateRequest) -> list[PreparedRequest]:
        """Tokenize once; one engine sequence per choice (seeded choices get seed, seed+1, ...)."""
        req.model = self.models.resolve(req.model)
        prepared = await self.tokenizer.prepare.remote(req)
        if req.n == 1:
            return [prepared]
        seed = prepared.sampling.seed
        return [
            replace(prepared, request_id=f"{prepared.request_id}-{i}",
                    sampling=replace(prepared.sampling, seed=None if seed is None else seed + i))
            for i in range(req.n)
        ]

    async def _generate(self, prepared: PreparedRequest) -> AsyncIterator[RequestOutput]:
        stream = self.models.handle(prepared.model).options(stream=True).generate.remote(prepared)
        try:
            async for out in stream:
                yield out
        finally:
            stream.cancel()  # no-op once finished; frees the engine slot if the client went away

    async def _complete(self, prepared: PreparedRequest) -> RequestOutput:
        result = None
        async for out in self._generate(prepared):
            result = out if result is None else result.merge(out)
        return result

    async def _respond(self, kind: str, body: openai.ChatCompletionRequest | openai.CompletionRequest):
        request_id = uuid.uuid4().hex
        req = body.to_internal(request_id)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        builder = openai.ResponseBuilder(kind, prefix + request_id, body.model, include_usage)
        prepared = await self._prepare(req)
        if not body.stream:
            return builder.complete(await asyncio.gather(*(self._complete(p) for p in prepared)))
        stream = _interleave([self._generate(p) for p in prepared])
        first = await anext(stream)  # errors before the first token still get a proper status code
        return StreamingResponse(self._sse(builder, first, stream, len(prepared)), media_type="text/event-stream")

    async def _sse(self, builder: openai.ResponseBuilder, first: tuple[int, RequestOutput],
                   rest: AsyncIterator[tuple[int, RequestOutput]], n: int):
        last: dict[int, RequestOutput] = {}  # each choice's latest delta (it carries the running counts)
        try:
            item = first
            while item is not None:
                index, out = item
                for line in builder.chunks(index, out, first=index not in last):
                    yield line
                last[index] = out
                item = await anext(rest, None)
            if builder.include_usage:
                yield builder.usage_chunk([last[i] for i in range(n)])
        except Exception as e:  # after the 200 the status is sent: report in the stream, never cut silently
            err = e if isinstance(e, ConduitError) else ConduitError(f"generation failed: {e}", 500, "server_error")
            log.warning("stream %s failed: %s", builder.id, e)
            yield openai.sse(openai.error_body(err))
        finally:
            await rest.aclose()
        yield openai.SSE_DONE

    # routes -------------------------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: openai.ChatCompletionRequest):
        return await self._respond("chat", body)

    @api.post("/v1/completions")
    async def completions(self, body: openai.CompletionRequest):
        return await self._respond("completion", body)

    @api.get("/v1/models")
    async def list_models(self):
        data = [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "conduit", "root": name}
            for model_id, name in self.models.ids.items()
        ]
        return {"object": "list", "data": data}

    @api.get("/v1/models/{model:path}")
    async def get_model(self, model: str):
        name = self.models.resolve(model)
        return {"id": model, "object": "model", "created": 0, "owned_by": "conduit", "root": name}

    @api.post("/tokenize")
    async def tokenize(self, body: openai.TokenizeRequest):
        req = body.to_internal(uuid.uuid4().hex)
        req.model = self.models.resolve(req.model)
        prepared = await self.tokenizer.prepare.remote(req)
        return {"tokens": prepared.prompt_ids, "count": len(prepared.prompt_ids),
                "max_model_len": await self.tokenizer.max_model_len.remote(req.model)}

    @api.post("/detokenize")
    async def detokenize(self, body: openai.DetokenizeRequest):
        model = self.models.resolve(body.model)
        return {"prompt": await self.tokenizer.detokenize.remote(model, body.tokens)}

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

