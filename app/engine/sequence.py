"""One request's state inside the engine: its tokens, its KV blocks, its decoding state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.lora.adapter import LoraAdapter
from app.engine.sampling_params import SamplingParams
from app.qos import class_rank


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class RequestTimings:
    """When things happened to one request in the engine (time.monotonic() seconds): the
    timestamps vLLM's latency metrics are built from (queue, prefill, decode, inter-token)."""

    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None

    def scheduled(self, now: float) -> None:
        if self.first_scheduled is None:
            self.first_scheduled = now

    def token(self, now: float) -> list[float]:
        """Record one new token; returns the gap since the previous token (none for the first)."""
        gap = [] if self.last_token is None else [now - self.last_token]
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        return gap


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        detokenizer: IncrementalDetokenizer,
        eos_ids: frozenset[int],
        priority: int = 0,
        tenant: str = "",
        lora: LoraAdapter | None = None,
    ):
        self.request_id = request_id
        self.priority = priority  # lower runs first (vLLM's convention)
        self.tenant = tenant  # whose share of the engine it uses (an API key's id; "" for none)
        self.rank = class_rank(priority)  # its priority class: 0 interactive, 1 standard, 2 batch
        self.order = 0  # arrival order, set by the scheduler: older first among equals
        self.waiting_since = time.monotonic()  # when it last joined the queue (arrival, or preemption)
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.eos_ids = eos_ids
        self.detokenizer = detokenizer
        self.status = SequenceStatus.WAITING
        self.block_ids: list[int] = []  # block table: position p's K/V is in block_ids[p // block_size]
        self.num_cached = 0  # tokens whose K/V are in its blocks
        self.finish_reason: str | None = None
        self.timings = RequestTimings()
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.matcher = None  # GuidedMatcher (app/engine/guided.py) when params.guided is set
        self.prompt_logprobs = None  # computed by its first prefill when params.prompt_logprobs is set
        self.lora = lora  # the LoRA adapter it decodes with (None: the base model)
        self.lora_slot: int | None = None  # the adapter's slot, pinned while it runs (scheduler.py)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token_id(self) -> int:
        """The token a decode step feeds in (no concatenation: this runs for every sequence every step)."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def scores_prompt(self) -> bool:
        """Its next prefill scores the prompt (asked, and not yet done: a recompute after preemption
        does not score again)."""
        return self.params.prompt_logprobs is not None and self.prompt_logprobs is None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return f"Sequence({self.request_id}, {self.status.name}, tokens={self.num_tokens}, blocks={len(self.block_ids)})"
