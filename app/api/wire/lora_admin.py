"""vLLM's runtime LoRA API: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (app/api/lora_table.py
does the work). Like every route they need an API key when keys are configured; errors take OpenAI's shape."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from app.api.adapter import Adapter, adapter
from app.api.pipeline import Pipeline
from app.api.wire.openai import error_body
from app.config import AppConfig


class LoadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=400)  # `<adapter>`, or `<base>:<adapter>`
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=400)


@adapter
def routes(pipeline: Pipeline, config: AppConfig):
    router = APIRouter()

    @router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)  # vLLM answers in plain text
    async def load_lora_adapter(body: LoadLoraAdapter):
        await pipeline.load_lora(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoraAdapter):
        await pipeline.unload_lora(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    paths = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
    return Adapter(router, lambda err: JSONResponse(error_body(err), status_code=err.status), paths=paths)
