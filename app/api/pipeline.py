"""The pipeline every wire format shares: resolve the model, tokenize once (one Ray hop to the
tokenizer deployment), then stream the engine's deltas from the model replica that the router
picks inside this process, through that replica's stream channel to this ingress (app/api/stream_mux.py).
Adapters (openai.py, anthropic.py, ...) translate to and from it; none of them calls a deployment directly."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace

import numpy as np

from app import access_log
from app.api.errors import ConduitError, invalid
from app.api.faults import bounded, bounded_iter
from app.api.input_limits import cap_max_tokens, check_embedding_request, check_generate
from app.api.lora_table import Target, load_at_runtime, unload_at_runtime
from app.api.model_table import ModelTable
from app.api.protocol import GenerateRequest, PreparedRequest
from app.api.stream_mux import StreamMux
from app.config import InputLimits
from app.engine.engine import RequestOutput
from app.limits import Reservation, current_call


class Pipeline:
    def __init__(self, tokenizer, models: ModelTable, embedders: ModelTable | None = None,
                 limits: InputLimits | None = None, mux: StreamMux | None = None):
        """`tokenizer`: the Tokenizer deployment's handle; `models`, `embedders`: the generative and the
        embedding models' tables; `limits`: caps on what one request may ask for; `mux`: this ingress
        replica's end of the model replicas' stream channels."""
        self.mux = mux or StreamMux(uuid.uuid4().hex)
        self.tokenizer = tokenizer
        self.models = models
        self.embedders = embedders or ModelTable({}, {})
        self.limits = limits or InputLimits()

    def served_ids(self) -> dict[str, str]:
        """Every id a client may send (names and aliases, both kinds of model) -> model name."""
        return {**self.models.ids, **self.embedders.ids}

    def resolve_any(self, model: str) -> str:
        return self.embedders.resolve(model) if model in self.embedders.ids else self.models.resolve(model)

    async def names_adapter(self, model: str) -> bool:
        """Whether `model` names a LoRA adapter of a served model (Azure takes one as a deployment)."""
        if model in self.embedders.ids:
            return False
        try:
            return (await self.models.target(model)).lora is not None
        except ConduitError:
            return False

    async def _generative(self, model: str) -> Target:
        """The base model (and LoRA adapter) a generative request names: this is where every wire
        format's `model` is resolved."""
        if model in self.embedders.ids:
            raise invalid(f"`{model}` is an embedding model; call /v1/embeddings with it", "model", "model_not_supported")
        return await self.models.target(model)

    async def adapters(self) -> list[tuple[str, str]]:
        """(adapter name, base model) of every LoRA adapter configured or loaded at runtime."""
        return await self.models.lora.listing() if self.models.lora else []

    async def load_lora(self, lora_name: str, lora_path: str) -> None:
        await load_at_runtime(self.models, lora_name, lora_path)

    async def unload_lora(self, lora_name: str) -> None:
        await unload_at_runtime(self.models, lora_name)

    async def prepare(self, req: GenerateRequest) -> tuple[list[PreparedRequest], Reservation]:
        """Tokenize once and reserve the key's tokens per minute for all it may use (prompt + n ×
        max_tokens; 429 when they do not fit); one engine sequence per choice (seeded choices get
        seed, seed+1, ...)."""
        check_generate(req, self.limits)
        started = time.monotonic()
        target = await self._generative(req.model)
        req.model = target.model  # the base's tokenizer and context window serve its adapters
        prepared = await self.tokenizer.prepare.remote(req)
        prepared.lora, prepared.lora_path = target.lora, target.lora_path
        prompt = len(prepared.prompt_ids)
        access_log.tokenized(req.model, prompt, time.monotonic() - started, req.messages or req.prompt)
        cap_max_tokens(req, prepared.sampling, self.limits)
        prepared.priority, prepared.tenant = current_call.get().scheduling(req.priority)
        reservation = await current_call.get().budget.reserve(prompt + req.n * prepared.sampling.max_tokens, prompt)
        if req.n == 1:
            return [prepared], reservation
        seed = prepared.sampling.seed
        return [
            replace(prepared, request_id=f"{prepared.request_id}-{i}",
                    sampling=replace(prepared.sampling, seed=None if seed is None else seed + i))
            for i in range(req.n)
        ], reservation

    async def generate(self, prepared: PreparedRequest, reservation: Reservation) -> AsyncIterator[RequestOutput]:
        stream = self.mux.generate(self.models.handle(prepared.model, prepared.lora), prepared)
        out = None
        try:
            async for out in stream:
                access_log.output(out)
                yield out
        finally:
            await stream.aclose()  # early: cancels the model call, which frees the engine slot
            reservation.use(out.num_output_tokens if out else 0)

    async def complete(self, req: GenerateRequest) -> list[RequestOutput]:
        """Every choice's whole output, in choice order; the first failure cancels the other choices."""
        async with bounded():  # the call's deadline; Ray's failures become 503s
            prepared, reservation = await self.prepare(req)
            try:
                return await run_all([self._collect(p, reservation) for p in prepared])
            finally:
                reservation.settle()

    async def complete_each(self, reqs: list[GenerateRequest]) -> list[RequestOutput]:
        """Several requests in one call (Vertex's instances): each counts as a request against the
        key's requests per minute (its admission counted one) and reserves its own tokens; the first
        failure cancels the others. One output each (n is 1), in order."""
        await current_call.get().budget.take_requests(len(reqs) - 1)
        return [out for (out,) in await run_all([self.complete(req) for req in reqs])]

    async def stream(self, req: GenerateRequest) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every choice's deltas as they arrive, tagged with the choice index. The first item is
        awaited before this returns, so errors before the first token still get a status code."""
        async with bounded():
            prepared, reservation = await self.prepare(req)
            merged = interleave([self.generate(p, reservation) for p in prepared])
            try:
                first = await anext(merged)
            except BaseException:
                reservation.settle()
                raise
        return _prepend(first, bounded_iter(merged), reservation)

    async def tokenize(self, req: GenerateRequest) -> tuple[list[int], int]:
        """(prompt token ids, the model's context window)."""
        check_generate(req, self.limits)
        req.model = (await self._generative(req.model)).model
        prepared = await self.tokenizer.prepare.remote(req)
        return prepared.prompt_ids, prepared.sampling.max_tokens + len(prepared.prompt_ids)

    async def detokenize(self, model: str, token_ids: list[int]) -> str:
        return await self.tokenizer.detokenize.remote((await self._generative(model)).model, token_ids)

    async def embed(
        self, model: str, inputs: list[str] | list[list[int]], dimensions: int | None = None
    ) -> tuple[np.ndarray, int]:
        """(one unit vector per input, as an (n, d) float32 array; prompt tokens read). `inputs`:
        texts, or token-id lists of the model's own tokenizer; `dimensions`: Matryoshka truncation."""
        if model in self.models.ids:
            raise invalid(f"`{model}` is a text-generation model, not an embedding model", "model", "model_not_supported")
        name = self.embedders.resolve(model)
        check_embedding_request(inputs, self.limits)
        vectors, prompt_tokens = await self.embedders.handle(name).embed.remote(inputs, dimensions)
        current_call.get().charge(prompt_tokens)  # the key's tokens per minute
        return vectors, prompt_tokens

    async def max_model_len(self, model: str) -> int:
        return await self.tokenizer.max_model_len.remote((await self.models.target(model)).model)

    async def _collect(self, prepared: PreparedRequest, reservation: Reservation) -> RequestOutput:
        result = None
        async for out in self.generate(prepared, reservation):
            result = out if result is None else result.merge(out)
        return result


async def _prepend(first, rest: AsyncIterator, reservation: Reservation) -> AsyncIterator:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()
        reservation.settle()


async def run_all(coroutines: list[Coroutine]) -> list:
    """Each coroutine's result, in order. The first failure cancels the others (their engine
    sequences are aborted) and is raised as it is, not in an ExceptionGroup."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


async def interleave(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Merge the choices' streams as their deltas arrive, tagged with the choice index."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
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
