"""Azure OpenAI wire format: OpenAI's bodies and responses under
`/openai/deployments/{deployment}/...?api-version=...`. The deployment in the path names a configured
model (its name or an alias) and overrides any `model` in the body, which Azure does not require.
Schemas, response building and streaming are the OpenAI adapter's own (app/api/openai.py).

The `api-key` header the Azure SDKs send carries the API key (app/auth.py reads it)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from app.api.errors import ConduitError
from app.api.openai import ChatCompletionRequest, CompletionRequest, error_body, respond
from app.api.pipeline import Pipeline

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


def routes(pipeline: Pipeline):
    from app.api.server import Adapter, request_id

    router = APIRouter()

    async def deployment_request(request: Request, deployment: str, kind: str, body: dict):
        require_api_version(request)
        if deployment not in pipeline.models.ids:
            raise deployment_not_found(deployment)
        schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
        parsed = parse_body(schema, body, pipeline.models.resolve(deployment))
        return await respond(pipeline, request_id(request), kind, parsed)

    @router.post(PREFIX + "/{deployment}/chat/completions")
    async def chat_completions(request: Request, deployment: str, body: dict):
        return await deployment_request(request, deployment, "chat", body)

    @router.post(PREFIX + "/{deployment}/completions")
    async def completions(request: Request, deployment: str, body: dict):
        return await deployment_request(request, deployment, "completion", body)

    return Adapter(router, lambda err: JSONResponse(error_body(err), status_code=err.status), prefixes=("/openai/",))
