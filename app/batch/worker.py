"""The Ray Data actor of `conduit batch`: one model replica's worth of devices, running the engine
(`LLMEngine`, stepped here: no HTTP, no streaming) over the batches of input lines Ray Data hands
it. A line goes the online route's way: the OpenAI adapter's body models, the input limits, the
tokenizer deployment's own `prepare` (chat template, tools, context-window checks), the engine,
and the adapter's response builder. Whatever one line does wrong ends in its own output line."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from app.api.errors import ConduitError
from app.api.input_limits import cap_max_tokens, check_generate
from app.api.protocol import PreparedRequest
from app.batch.lines import LineError, job_line_error, parse_line
from app.batch.requests import LineRequest, answer_line, check_size, refusal_line, to_request
from app.config import EngineConfig, IngressConfig, ModelConfig
from app.engine.engine import RequestOutput
from app.engine.errors import RequestRejected
from app.engine.lora import LoraAdapter, LoraError, load_adapter

if TYPE_CHECKING:
    from app.api.lora_table import Target

FLUSH_LINES = 32  # finished lines handed back to Ray Data at once (or after FLUSH_S)
FLUSH_S = 1.0
# An offline job has no first token to keep fast, so its engine decodes at least this many sequences
# at once, in the KV cache the serving replica would have: a larger batch makes more tokens a second
# (bench/batch.py, demo model, 2 cores: 0.61x the raw batch-32 decode at 32 sequences, 0.97x at 128).
OFFLINE_MAX_NUM_SEQS = 128


def offline_engine(config: EngineConfig) -> EngineConfig:
    """`config` (resolved: its KV cache already sized) with the offline batch size."""
    return config.model_copy(update={"max_num_seqs": max(config.max_num_seqs, OFFLINE_MAX_NUM_SEQS)})


@dataclass
class _Running:
    """One line's request in the engine: its choices' sequence ids and their outputs so far."""

    request: LineRequest
    choices: list[str]
    echo: str | None
    outs: dict[str, RequestOutput] = field(default_factory=dict)

    def done(self) -> bool:
        return len(self.outs) == len(self.choices) and all(o.finished for o in self.outs.values())


class BatchWorker:
    """Ray Data callable class: `__call__` takes {"text", "line", "utf8"} rows (app/batch/source.py) and yields
    {"line": output lines, "completion_tokens": per line, "node": this actor's node id} as lines finish."""

    def __init__(self, model: ModelConfig, ingress: IngressConfig):
        import ray
        import torch

        from app.api.lora_table import LoraTable
        from app.api.model_table import ModelTable
        from app.loading import build_engine, pick_device, resolved_engine_config
        from deployments.tokenizer import Tokenizer

        engine_config = offline_engine(resolved_engine_config(model))
        model = model.model_copy(update={"engine": engine_config})
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(engine_config.num_threads or max(1, int(cpus)))  # as the Model deployment does
        self.model, self.ingress, self.limits = model, ingress, ingress.input_limits
        # the online routes' model ids: the model's name and aliases, and its LoRA adapters if it has any
        lora = LoraTable({model.name: model.lora}) if model.lora else None
        self.models = ModelTable({model.name: model.aliases}, {}, lora)
        self.adapters: dict[str, LoraAdapter] = {}  # read on first use, as a replica's cache does
        # the deployment's class itself, outside Serve: the online route's prompt rendering and checks
        self.tokenizer = Tokenizer.func_or_class([model])
        self.loop = asyncio.new_event_loop()  # its `prepare` is a coroutine (it never waits on anything)
        self.engine = build_engine(model, pick_device(engine_config))
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> Iterator[dict]:
        finished: list[tuple[str, int]] = []  # (output line, completion tokens)
        running: dict[str, _Running] = {}  # by sequence id
        for text, number, utf8 in zip(batch["text"], batch["line"], batch["utf8"]):
            self._start(str(text), int(number), bool(utf8), running, finished)
        flushed = time.monotonic()
        while self.engine.has_work():
            for out in self.engine.step():
                self._collect(out, running, finished)
            if len(finished) >= FLUSH_LINES or (finished and time.monotonic() - flushed > FLUSH_S):
                yield self._columns(finished)
                finished, flushed = [], time.monotonic()
        if finished:
            yield self._columns(finished)

    def _columns(self, finished: list[tuple[str, int]]) -> dict:
        return {"line": [line for line, _ in finished], "completion_tokens": [n for _, n in finished],
                "node": [self.node] * len(finished)}

    # one line in ---------------------------------------------------------------------------------
    def _start(self, text: str, number: int, utf8: bool, running: dict[str, _Running], finished: list) -> None:
        parsed = parse_line(text, utf8)
        if isinstance(parsed, LineError):
            finished.append((job_line_error(parsed, number, self.model.name), 0))
            return
        request = None
        try:
            check_size(text, self.ingress)
            request = to_request(parsed, lambda model: self.loop.run_until_complete(self.models.target(model)))
            choices, echo = self._prepare(request)
            lora = self._adapter(request.target)
            for prepared in choices:  # a refusal here leaves none of them in the engine
                self._add(prepared, [p.request_id for p in choices], lora)
        except Exception as e:  # one line's failure is its own: the route's 4xx, or a 500 as online
            err = e if isinstance(e, ConduitError) else ConduitError(f"Preparing the request failed: {e}", 500,
                                                                     "server_error")
            finished.append((refusal_line(parsed.custom_id, err, request and request.request_id), 0))
            return
        entry = _Running(request, [p.request_id for p in choices], echo)
        running.update({p.request_id: entry for p in choices})

    def _prepare(self, request: LineRequest) -> tuple[list[PreparedRequest], str | None]:
        """As the Pipeline prepares a request: limits, tokenizer, max_tokens cap, one engine sequence
        per choice (seeded choices get seed, seed+1, ...)."""
        req = request.req
        check_generate(req, self.limits)
        prepared = self.loop.run_until_complete(self.tokenizer.prepare(req))
        cap_max_tokens(req, prepared.sampling, self.limits)
        echo = None
        if request.line.kind == "completion" and request.body.echo:
            echo = req.prompt if isinstance(req.prompt, str) else self.engine.tokenizer.decode(req.prompt)
        if req.n == 1:
            return [prepared], echo
        seed = prepared.sampling.seed
        return [replace(prepared, request_id=f"{prepared.request_id}-{i}",
                        sampling=replace(prepared.sampling, seed=None if seed is None else seed + i))
                for i in range(req.n)], echo

    def _adapter(self, target: Target) -> LoraAdapter | None:
        """The LoRA adapter `target` names, read once per job worker; its errors as the route's."""
        if target.lora is None:
            return None
        if target.lora not in self.adapters:
            from deployments.lora_cache import api_error  # a replica's own mapping of adapter errors

            try:
                self.adapters[target.lora] = load_adapter(target.lora, target.lora_path, self.engine.model,
                                                          self.model.lora.max_rank)
            except LoraError as e:
                raise api_error(target.lora, e) from None
        return self.adapters[target.lora]

    def _add(self, prepared: PreparedRequest, siblings: list[str], lora: LoraAdapter | None) -> None:
        try:
            self.engine.add_request(prepared.request_id, prepared.prompt_ids, prepared.sampling, lora=lora)
        except RequestRejected as e:  # e.g. it can never fit in the KV cache: a 400, as online
            for sequence_id in siblings:
                self.engine.abort_request(sequence_id)
            raise ConduitError(e.message, 400, param=e.param) from None

    # one line out --------------------------------------------------------------------------------
    def _collect(self, out: RequestOutput, running: dict[str, _Running], finished: list) -> None:
        entry = running.get(out.request_id)
        if entry is None:  # a sibling of a failed choice, already answered
            return
        if out.finish_reason == "error":
            from deployments.model import request_failed  # the replica's own mapping of engine failures

            for sequence_id in entry.choices:
                self.engine.abort_request(sequence_id)
                running.pop(sequence_id, None)
            err = request_failed(entry.request.request_id, out.error)
            finished.append((refusal_line(entry.request.line.custom_id, err, entry.request.request_id), 0))
            return
        previous = entry.outs.get(out.request_id)
        entry.outs[out.request_id] = out if previous is None else previous.merge(out)
        if entry.done():
            outs = [entry.outs[sequence_id] for sequence_id in entry.choices]
            for sequence_id in entry.choices:
                running.pop(sequence_id)
            finished.append((answer_line(entry.request, outs, entry.echo), sum(o.num_output_tokens for o in outs)))
