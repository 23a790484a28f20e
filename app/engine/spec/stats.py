"""Speculative decoding's counters, cumulative per engine, exported under vLLM's metric names
(app/metrics.py: SPEC_COUNTERS). The engine thread records; the metrics poller reads a `snapshot()`
(copies, so it never sees a half-updated step)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0  # verified drafts (one per sequence per speculative step)
    num_draft_tokens: int = 0  # their tokens
    num_accepted_tokens: int = 0  # of those, the ones that stood
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: drafts whose token j stood

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One sequence's verified draft: `num_accepted` leading tokens of `num_draft_tokens` stood."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_draft_tokens:
            self.accepted_per_position += [0] * (num_draft_tokens - len(self.accepted_per_position))
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    @property
    def acceptance_rate(self) -> float:
        """Draft tokens that stood / draft tokens verified (vLLM's draft acceptance rate)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verified draft, the target's own token included (vLLM's definition)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def snapshot(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               list(self.accepted_per_position))

    def summary(self) -> dict:
        """For `conduit status`: the counters and the two ratios."""
        return {"drafts": self.num_drafts, "draft_tokens": self.num_draft_tokens,
                "accepted_tokens": self.num_accepted_tokens, "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_acceptance_length": round(self.mean_acceptance_length, 3),
                "accepted_per_position": list(self.accepted_per_position)}
