"""Bounds on the numeric request fields that reach the engine, shared by every wire format, so a
value the engine cannot use is a 400 naming the field in the API's own shape, never an engine fault.

Floats are finite (Python's JSON parser accepts `NaN` and `Infinity`). Where a wire format's own
range admits values the engine cannot compute with, the range is narrowed here and says why."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from app.engine.sampling_params import MIN_REPETITION_PENALTY

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def real(**bounds) -> type:
    """A finite float within `bounds` (pydantic's ge / gt / le / lt)."""
    return Annotated[float, Field(allow_inf_nan=False, **bounds)]


# vLLM's range: a 64-bit signed integer (torch's generator takes 64 bits; n > 1 adds the choice index)
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
# an int any request field may hold: a count of tokens, choices or alternatives (caps that depend on
# the server are ingress.input_limits, checked in the Pipeline)
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
PositiveCount = Annotated[int, Field(gt=0, le=2**31 - 1)]
# vLLM's scheduling priority (lower runs first); the key's policy caps it (app/limits.py Call.scheduling)
Priority = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


def zero_or_usable_penalty(value: float) -> float:
    """For formats where a repetition_penalty of 0 means "off": 0, or at least MIN_REPETITION_PENALTY."""
    if value != 0 and not value >= MIN_REPETITION_PENALTY:
        raise ValueError(f"must be 0 (off) or in [{MIN_REPETITION_PENALTY}, 2]")
    return value
