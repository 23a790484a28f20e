"""The internal request that every wire format is translated into, and what the tokenizer makes
of it. Plain dataclasses: they cross Ray hops (pickled) on every request."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.engine.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    request_id: str
    model: str
    sampling: SamplingParams
    prompt: str | list[int] | None = None  # text, or token ids used as they are
    messages: list[dict] | None = None  # chat: rendered with the model's chat template
    max_tokens_given: bool = True  # False: fill the rest of the context window
    stream: bool = False
    n: int = 1  # choices: n engine sequences from one prepared prompt


@dataclass
class PreparedRequest:
    request_id: str
    model: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
