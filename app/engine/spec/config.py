"""`engine.speculative:` in serve_config.yaml: which proposer drafts tokens, how many, and when
speculation steps aside. Defaults come from bench/spec_decode.py (docs/speculative-decoding.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from app.config import Strict


class SpeculativeConfig(Strict):
    method: Literal["ngram", "draft_model"] = Field(
        "ngram", description="ngram: prompt lookup over the prompt and the output so far; draft_model: a smaller "
        "model with the same tokenizer, with its own paged KV cache on the same replica")
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="draft tokens verified per sequence per step")
    prompt_lookup_min: int = Field(1, ge=1, le=32, description="ngram: the shortest suffix looked up")
    prompt_lookup_max: int = Field(3, ge=1, le=32, description="ngram: the longest suffix looked up (tried first)")
    draft_model: str | None = Field(None, min_length=1, description="draft_model: a local directory or model id")
    draft_num_kv_blocks: int | None = Field(
        None, gt=0, description="draft_model: its KV cache in blocks; default: as many as the target's")
    disable_by_batch_size: int | None = Field(
        8, gt=0, description="no speculation in a step with this many running sequences or more (null: never off)")
    min_acceptance_rate: float = Field(
        0.3, ge=0, le=1, description="a sequence whose recent drafts are accepted less often than this stops "
        "drafting for a while (0: never)")

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) exceeds prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        if self.method == "draft_model" and self.draft_model is None:
            raise ValueError("method draft_model needs draft_model: the draft model's directory or id")
        if self.method == "ngram" and self.draft_model is not None:
            raise ValueError("draft_model is set but method is ngram: set method: draft_model, or drop draft_model")
        return self
