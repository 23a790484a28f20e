"""Hugging Face Text Generation Inference (TGI) wire format: `POST /generate`, `POST /generate_stream`,
the compatibility route `POST /` (streams when the body says so; `huggingface_hub.InferenceClient`
posts `text_generation` there), and `GET /info`.

TGI serves one model per endpoint: here the first configured model, unless the body's `model` (a
Conduit extension) names another. Sampling follows TGI: greedy unless `do_sample` is set or a warper
(`temperature` != 1, `top_k`, `top_p`) is given; a sampled request without `seed` gets a random one,
reported in `details.seed`. Like TGI, `generated_text` includes the stop sequence that ended it.

Token texts: the engine streams coalesced deltas. Each token gets its own text when the delta's
text is exactly their concatenation; otherwise the delta's text rides on its last token and the
others carry "", so concatenating `token.text` always gives `generated_text`. Ids and log-probs (the
model's raw log-softmax) are per token. `top_n_tokens` and `decoder_input_details`
(`details.prefill`) come from the engine's log-probs, and a `json` grammar is guided decoding."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.adapter import Adapter, adapter, request_id
from app.api.bounds import INT64_MAX, MIN_REPETITION_PENALTY, PositiveCount, real
from app.api.errors import ConduitError, invalid, stream_failure
from app.api.pipeline import Pipeline
from app.api.protocol import GenerateRequest
from app.api.wire.openai import sse
from app.config import AppConfig
from app.engine.engine import RequestOutput
from app.engine.logprobs import Logprob
from app.engine.sampling_params import GuidedDecoding, SamplingParams
from app.engine.schema_limits import check_schema

MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences
DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default when the field is absent (null: the rest of the window)
MAX_TOP_N_TOKENS = 5  # TGI's default --max-top-n-tokens
UNSUPPORTED = ("adapter_id", "truncate", "typical_p")


class Grammar(BaseModel):
    """TGI's constrained output: JSON for a schema (guided decoding); regex is not implemented."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["json", "json_object", "regex"]
    value: dict | str

    def guided(self) -> GuidedDecoding:
        if self.type == "regex":
            raise invalid("grammar of type `regex` is not supported by this server; use `json`", "grammar")
        schema = json.loads(self.value) if isinstance(self.value, str) else self.value
        try:
            check_schema(schema)
        except ValueError as e:
            raise invalid(f"grammar: {e}", "grammar") from None
        return GuidedDecoding(schema, param="grammar")


class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: PositiveCount | None = DEFAULT_MAX_NEW_TOKENS
    temperature: real(gt=0, le=100) | None = None
    top_p: real(gt=0, lt=1) | None = None
    top_k: PositiveCount | None = None
    repetition_penalty: real(ge=MIN_REPETITION_PENALTY, le=100) | None = None
    frequency_penalty: real(ge=-2, le=2) | None = None
    stop: Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] = []
    seed: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    do_sample: bool = False
    details: bool = False
    decoder_input_details: bool = False  # the prompt's tokens and log-probs in `details.prefill`
    top_n_tokens: Annotated[int, Field(ge=0, le=MAX_TOP_N_TOKENS)] | None = None
    grammar: Grammar | None = None
    return_full_text: bool | None = False
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None  # several sequences per request: not here
    watermark: bool = False
    # TGI parameters Conduit does not implement: refused by name rather than ignored
    adapter_id: Any = None
    truncate: Any = None
    typical_p: Any = None

    @model_validator(mode="after")
    def _supported(self) -> Parameters:
        given = [name for name in UNSUPPORTED if getattr(self, name) is not None]
        given += ["watermark"] * self.watermark
        if given:
            raise ValueError(f"`{given[0]}` is not supported by this server")
        return self

    @property
    def sampled(self) -> bool:
        warped = (self.temperature not in (None, 1.0)) or self.top_k is not None or self.top_p is not None
        return self.do_sample or warped

    def sampling(self, stream: bool) -> SamplingParams:
        seed = None
        if self.sampled:
            seed = self.seed if self.seed is not None else random.getrandbits(63)
        return SamplingParams(
            max_tokens=self.max_new_tokens or 1,
            temperature=(self.temperature or 1.0) if self.sampled else 0.0,
            top_p=self.top_p or 1.0,
            top_k=self.top_k or 0,
            seed=seed,
            repetition_penalty=self.repetition_penalty or 1.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=list(self.stop),
            # every streamed token and every `details` token carries its log-prob
            logprobs=(self.top_n_tokens or 0) if stream or self.details or self.top_n_tokens else None,
            prompt_logprobs=0 if self.decoder_input_details else None,
            guided=self.grammar.guided() if self.grammar else None,
        )


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False  # read by the compatibility route `POST /` only
    model: str | None = None  # Conduit extension: a configured model other than the first

    def to_internal(self, request_id: str, model: str, stream: bool) -> GenerateRequest:
        p = self.parameters
        if stream and p.decoder_input_details:
            raise invalid("`decoder_input_details` == true is not supported when streaming tokens",
                          "decoder_input_details")
        return GenerateRequest(
            request_id=request_id,
            model=model,
            sampling=p.sampling(stream),
            prompt=self.inputs,
            max_tokens_given=p.max_new_tokens is not None,
            stream=stream,
        )


# responses ------------------------------------------------------------------------------------
def error_response(err: ConduitError) -> JSONResponse:
    """TGI's error body; huggingface_hub raises the exception that `error_type` names."""
    if err.status in (429, 503):
        status, kind = 429, "overloaded"
    elif err.status >= 500:
        status, kind = 424, "generation"  # TGI's status for a failed generation
    else:
        status, kind = (422 if err.status == 400 else err.status), "validation"
    return JSONResponse({"error": err.message, "error_type": kind}, status_code=status)


def finish_reason(out: RequestOutput) -> str:
    if out.finish_reason == "length":
        return "length"
    return "eos_token" if out.stop_reason is None else "stop_sequence"


def delta_text(out: RequestOutput) -> str:
    """The delta's text, plus the stop sequence that ended it (TGI keeps it in the output)."""
    ended_by_stop = out.finished and isinstance(out.stop_reason, str) and out.finish_reason == "stop"
    return out.text + out.stop_reason if ended_by_stop else out.text


def standalone(lp: Logprob) -> dict:
    """A token decoded on its own, as TGI gives prefill and top tokens."""
    return {"id": lp.token_id, "text": lp.token, "logprob": lp.logprob}


def delta_tokens(out: RequestOutput, text: str) -> list[tuple[dict, list[dict]]]:
    """(TGI's token object, its top alternatives) for each token of one engine delta; an EOS that
    ended it is a special token (the tokenizer's other special ids are not known here)."""
    ends_with_eos = out.finished and finish_reason(out) == "eos_token"
    last = len(out.token_ids) - 1
    carrier = last - 1 if ends_with_eos and last > 0 else last  # the last token with text
    entries = out.logprobs or [None] * len(out.token_ids)
    texts = [""] * len(out.token_ids)
    names = [e.chosen.token for e in entries[: carrier + 1] if e]
    if "".join(names) == text and len(names) == carrier + 1:
        texts[: carrier + 1] = names
    else:  # e.g. a character split across tokens, or a stop sequence cut inside a token
        texts[carrier] = text
    tokens = []
    for i, (token_id, entry) in enumerate(zip(out.token_ids, entries)):
        token = {
            "id": token_id,
            "text": texts[i],
            "logprob": entry.chosen.logprob if entry else None,
            "special": ends_with_eos and i == last,
        }
        top = [{**standalone(t), "special": False} for t in entry.top] if entry else []
        tokens.append((token, top))
    return tokens


def details(out: RequestOutput, seed: int | None) -> dict:
    return {"finish_reason": finish_reason(out), "generated_tokens": out.num_output_tokens, "seed": seed}


async def generate_whole(stream, body: GenerateBody, seed: int | None) -> tuple[dict, RequestOutput]:
    """(TGI's /generate answer, the last delta) from the engine's deltas."""
    p = body.parameters
    text, tokens, first, last = "", [], None, None
    async for _, out in stream:
        delta = delta_text(out)
        text += delta
        tokens += delta_tokens(out, delta)
        first, last = first or out, out
    answer = {"generated_text": body.inputs + text if p.return_full_text else text}
    if p.details:
        prefill = [standalone(e.chosen) for e in first.prompt_logprobs] if p.decoder_input_details else []
        answer["details"] = {**details(last, seed), "prefill": prefill, "tokens": [t for t, _ in tokens],
                             "best_of_sequences": None}
        if p.top_n_tokens:
            answer["details"]["top_tokens"] = [top for _, top in tokens]
    return answer, last


async def token_events(stream, body: GenerateBody, seed: int | None) -> AsyncIterator[str]:
    """TGI's SSE: one event per token; the last also carries `generated_text` (and `details`)."""
    p = body.parameters
    generated = body.inputs if p.return_full_text else ""
    index = 0
    try:
        async for _, out in stream:
            delta = delta_text(out)
            generated += delta
            tokens = delta_tokens(out, delta)
            for i, (token, top) in enumerate(tokens):
                index += 1
                final = out.finished and i == len(tokens) - 1
                event = {"index": index, "token": token, "generated_text": None, "details": None}
                if p.top_n_tokens:
                    event["top_tokens"] = top
                if final:
                    event["generated_text"] = generated
                    if p.details:
                        event["details"] = {**details(out, seed), "input_length": out.num_prompt_tokens}
                yield sse(event)
    except Exception as e:  # after the 200 the status is sent: TGI reports errors as an event
        err = stream_failure(e)
        yield sse({"error": err.message, "error_type": "generation" if err.status >= 500 else "validation"})
    finally:
        await stream.aclose()


# routes ---------------------------------------------------------------------------------------
@adapter
def routes(pipeline: Pipeline, config: AppConfig):
    router = APIRouter()
    default_model = next(iter(pipeline.models.ids.values()))  # the first configured model

    async def start(request: Request, body: GenerateBody, stream: bool):
        req = body.to_internal(request_id(request), body.model or default_model, stream)
        return await pipeline.stream(req), req.sampling.seed  # first delta awaited: early errors get a status

    async def generate(request: Request, body: GenerateBody) -> tuple[dict, dict]:
        deltas, seed = await start(request, body, stream=False)
        answer, last = await generate_whole(deltas, body, seed)
        headers = {"x-prompt-tokens": str(last.num_prompt_tokens), "x-generated-tokens": str(last.num_output_tokens)}
        return answer, headers

    @router.post("/generate")
    async def generate_route(request: Request, body: GenerateBody):
        answer, headers = await generate(request, body)
        return JSONResponse(answer, headers=headers)

    @router.post("/generate_stream")
    async def generate_stream(request: Request, body: GenerateBody):
        deltas, seed = await start(request, body, stream=True)
        return StreamingResponse(token_events(deltas, body, seed), media_type="text/event-stream")

    @router.post("/")
    async def compat_generate(request: Request, body: GenerateBody):
        """TGI's compatibility route: streams per the body's flag, else a one-element list."""
        if body.stream:
            return await generate_stream(request, body)
        answer, headers = await generate(request, body)
        return JSONResponse([answer], headers=headers)

    @router.get("/info")
    async def info():
        window = await pipeline.max_model_len(default_model)
        return {
            "model_id": default_model,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_best_of": 1,
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_tokens": window - 1,
            "max_total_tokens": window,
            "router": "conduit",
            "version": "conduit",
        }

    return Adapter(router, error_response, prefixes=("/generate", "/info"), paths=("/",))
