"""Per-request decoding controls. Plain dataclass: the engine imports nothing from Ray or the API
layer; wire formats validate their own fields and build one of these."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from app.engine.errors import RequestRejected

# below this a temperature is greedy (vLLM's _SAMPLING_EPS): dividing logits by it overflows float32
GREEDY_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 0.01  # the penalty divides logits: below this they overflow float32
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class GuidedDecoding:
    """Constrains the output to JSON (compiled into a token mask by `app/engine/guided.py`):
    any JSON object when `json_schema` is None, else a value valid for that JSON Schema. Forced tool
    calls use it too, with a schema built by `app/api/tools.py`."""

    json_schema: dict | None = None
    param: str | None = None  # the request field the schema came from (a compile error names it)
    compiled: object | None = field(default=None, repr=False, compare=False)  # set on the model replica


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    # None: no log-probs (no cost). k >= 0: each output token's log-prob under the model's raw
    # logits (log-softmax before temperature, penalties or masks) plus the k most likely tokens.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (the first has none)
    guided: GuidedDecoding | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def check(self) -> None:
        """Raise RequestRejected naming the first field the engine cannot compute with. Wire formats
        bound their fields first (app/api/bounds.py); this keeps the engine safe from any caller."""
        floats = {"temperature": self.temperature, "top_p": self.top_p, "min_p": self.min_p,
                  "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                  "repetition_penalty": self.repetition_penalty}
        for name, value in floats.items():
            if not math.isfinite(value):
                raise RequestRejected(f"{name} must be a finite number, not {value}", name)
        rules = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty >= MIN_REPETITION_PENALTY, "repetition_penalty",
             f"must be >= {MIN_REPETITION_PENALTY}"),
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1], "seed", "must fit in 64 bits"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", "must be >= 0"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs", "must be >= 0"),
        ]
        for ok, name, rule in rules:
            if not ok:
                raise RequestRejected(f"{name} {rule}, not {getattr(self, name)}", name)

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
