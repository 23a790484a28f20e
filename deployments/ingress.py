"""Ingress deployment: the one HTTP entry. Parses a wire format into the internal request, asks
the tokenizer deployment to prepare it, and streams the model replica's deltas back.

Path of one request: proxy -> Ingress (this) -> Tokenizer.prepare (one hop) -> Model.generate
(one streaming call, picked by deployments/router.py inside this process) -> deltas back here."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.api import openai
from app.api.errors import ConduitError
from app.api.protocol import GenerateRequest
from app.config import AppConfig
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


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=512)
@serve.ingress(api)
class Ingress:
    def __init__(self, config: AppConfig, tokenizer: DeploymentHandle, models: dict[str, DeploymentHandle]):
        self.config = config
        self.tokenizer = tokenizer
        self.models = ModelTable({m.name: m.aliases for m in config.models}, models)

    # pipeline -----------------------------------------------------------------------------------
    async def _generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        req.model = self.models.resolve(req.model)
        prepared = await self.tokenizer.prepare.remote(req)
        stream = self.models.handle(req.model).options(stream=True).generate.remote(prepared)
        try:
            async for out in stream:
                yield out
        finally:
            stream.cancel()  # no-op once finished; frees the engine slot if the client went away

    async def _complete(self, req: GenerateRequest) -> RequestOutput:
        result = None
        async for out in self._generate(req):
            result = out if result is None else result.merge(out)
        return result

    async def _respond(self, kind: str, body: openai.ChatCompletionRequest | openai.CompletionRequest):
        request_id = uuid.uuid4().hex
        req = body.to_internal(request_id)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        builder = openai.ResponseBuilder(kind, prefix + request_id, body.model, include_usage)
        if not body.stream:
            return builder.complete(await self._complete(req))
        stream = self._generate(req)
        first = await anext(stream)  # errors before the first token still get a proper status code
        return StreamingResponse(self._sse(builder, first, stream), media_type="text/event-stream")

    async def _sse(self, builder: openai.ResponseBuilder, first: RequestOutput, rest: AsyncIterator[RequestOutput]):
        try:
            for line in builder.chunks(first, first=True):
                yield line
            if not first.finished:
                async for out in rest:
                    for line in builder.chunks(out, first=False):
                        yield line
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

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}
