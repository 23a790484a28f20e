"""Per-request decoding controls. Plain dataclass: the engine imports nothing from Ray or the API
layer; wire formats validate their own fields and build one of these."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GuidedDecoding:
    """Constrains the output to JSON (compiled into a token mask by `app/engine/guided.py`):
    any JSON object when `json_schema` is None, else a value valid for that JSON Schema. Forced tool
    calls use it too, with a schema built by `app/api/tools.py`."""

    json_schema: dict | None = None


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
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
