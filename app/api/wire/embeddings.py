"""OpenAI's embeddings wire format: `POST /v1/embeddings` over `Pipeline.embed`.

`input` is a string, a list of strings, one list of token ids or a list of them; vectors come back
as JSON floats or, with `encoding_format: base64`, as the base64 of their little-endian float32
bytes (what the openai SDK asks for by default and decodes with numpy)."""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.api.adapter import Adapter, adapter
from app.api.bounds import PositiveCount
from app.api.pipeline import Pipeline
from app.api.wire.openai import error_body
from app.config import AppConfig

TokenIds = list[Annotated[int, Field(ge=0)]]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveCount | None = None
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        """Always a list of inputs: a lone string or a lone token-id list becomes a list of one."""
        if isinstance(self.input, str) or (self.input and isinstance(self.input[0], int)):
            return [self.input]
        return self.input


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()


def embedding_response(model: str, vectors: np.ndarray, prompt_tokens: int, encoding_format: str) -> dict:
    data = [{"object": "embedding", "index": i, "embedding": encode(v, encoding_format)} for i, v in enumerate(vectors)]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


@adapter
def routes(pipeline: Pipeline, config: AppConfig):
    router = APIRouter()

    @router.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        vectors, prompt_tokens = await pipeline.embed(body.model, body.inputs(), body.dimensions)
        # JSONResponse directly: FastAPI's encoder would walk every float of every vector
        return JSONResponse(embedding_response(body.model, vectors, prompt_tokens, body.encoding_format))

    return Adapter(router, lambda err: JSONResponse(error_body(err), status_code=err.status))
