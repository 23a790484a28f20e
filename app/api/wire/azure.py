"""Azure OpenAI wire format: OpenAI's bodies and responses under
`/openai/deployments/{deployment}/...?api-version=...` (chat/completions, completions, embeddings).
The deployment in the path names a configured model (its name or an alias; an embedding model for
embeddings; for chat and completions also a LoRA adapter, by either of its ids) and overrides any
`model` in the body, which Azure does not require. Schemas, response
building and streaming are the OpenAI and embeddings adapters' own (app/api/wire/openai.py, embeddings.py).

The `api-key` header the Azure SDKs send carries the API key (app/auth.py reads it)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from app.api.adapter import Adapter, adapter, request_id
from app.api.errors import ConduitError
from app.api.pipeline import Pipeline
from app.api.wire.embeddings import EmbeddingRequest, embedding_response
from app.api.wire.openai import ChatCompletionRequest, CompletionRequest, error_body, respond
from app.config import AppConfig

PREFIX = "/openai/deployments"


def deployment_not_found(deployment: str) -> ConduitError:
    return ConduitError(f"The API deployment `{deployment}` does not exist for this resource.",
                        404, param="deployment", code="DeploymentNotFound")


def require_api_version(request: Request) -> None:
    if not request.query_params.get("api-version"):
        raise ConduitError("The api-version query parameter (?api-version=) is required for all requests.",
                           400, param="api-version", code="MissingApiVersionParameter")


def parse_body(schema: type[BaseModel], body: dict, model: str) -> BaseModel:
    """Validate like a FastAPI body (same 400s), with the deployment's model filled in."""
    try:
        return schema.model_validate({**body, "model": model})
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


@adapter
def routes(pipeline: Pipeline, config: AppConfig):
    router = APIRouter()

    async def parse(request: Request, deployment: str, schema: type[BaseModel], body: dict) -> BaseModel:
        require_api_version(request)
        if deployment in pipeline.served_ids():
            return parse_body(schema, body, pipeline.resolve_any(deployment))
        if schema is not EmbeddingRequest and await pipeline.names_adapter(deployment):
            return parse_body(schema, body, deployment)  # the pipeline resolves the adapter as for OpenAI's routes
        raise deployment_not_found(deployment)

    @router.post(PREFIX + "/{deployment}/chat/completions")
    async def chat_completions(request: Request, deployment: str, body: dict):
        parsed = await parse(request, deployment, ChatCompletionRequest, body)
        return await respond(pipeline, request_id(request), "chat", parsed)

    @router.post(PREFIX + "/{deployment}/completions")
    async def completions(request: Request, deployment: str, body: dict):
        parsed = await parse(request, deployment, CompletionRequest, body)
        return await respond(pipeline, request_id(request), "completion", parsed)

    @router.post(PREFIX + "/{deployment}/embeddings")
    async def embeddings(request: Request, deployment: str, body: dict):
        parsed = await parse(request, deployment, EmbeddingRequest, body)
        vectors, prompt_tokens = await pipeline.embed(parsed.model, parsed.inputs(), parsed.dimensions)
        return JSONResponse(embedding_response(parsed.model, vectors, prompt_tokens, parsed.encoding_format))

    return Adapter(router, lambda err: JSONResponse(error_body(err), status_code=err.status), prefixes=("/openai/",))
