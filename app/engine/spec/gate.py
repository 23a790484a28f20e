"""When speculation steps aside. Each decode step the gate gives every running sequence its draft
budget k (0: it decodes plainly this step):

- the whole step decodes plainly when the batch is large (`disable_by_batch_size`): a batched decode
  already keeps the device busy, and verifying k+1 tokens per sequence costs more than it saves;
- a guided request decodes plainly (its grammar mask must advance token by token);
- k never passes the tokens the request may still produce less one (the target's own token), so a
  verified step never overshoots max_tokens or the context window;
- a sequence whose recent drafts mostly fell (an acceptance average below `min_acceptance_rate`)
  stops drafting for a while, twice as long each time it trips again, and then tries again.

A seeded sampled request's budget depends on its own history only, never on the batch size, so it
draws the same tokens alone as in any batch (rejection sampling consumes randomness differently from
plain sampling: speculating in one batch and not another would change its text)."""

from __future__ import annotations

from dataclasses import dataclass

from app.config import SpeculativeConfig

SMOOTHING = 0.3  # weight of the latest draft in a sequence's acceptance average
FIRST_PAUSE_STEPS = 8  # steps without drafting the first time the average falls below the floor
MAX_PAUSE_STEPS = 256


@dataclass
class _Acceptance:
    average: float = 1.0  # optimistic: a new sequence drafts at once
    step: int = 0
    resume_at: int = 0
    pause: int = FIRST_PAUSE_STEPS


class SpecGate:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.k = config.num_speculative_tokens
        self.max_batch = config.disable_by_batch_size
        self.floor = config.min_acceptance_rate
        self.max_model_len = max_model_len
        self.history: dict[str, _Acceptance] = {}

    def budgets(self, seqs: list) -> list[int]:
        """The most draft tokens each sequence may take this step."""
        large = self.max_batch is not None and len(seqs) >= self.max_batch
        return [0 if large and seq.generator is None else self._budget(seq) for seq in seqs]

    def _budget(self, seq) -> int:
        if seq.matcher is not None:
            return 0
        left = min(seq.params.max_tokens - len(seq.output_ids), self.max_model_len - seq.num_tokens)
        history = self.history.setdefault(seq.request_id, _Acceptance())
        history.step += 1
        if history.step < history.resume_at:
            return 0
        return max(0, min(self.k, left - 1))

    def record(self, request_id: str, num_draft_tokens: int, num_accepted: int) -> None:
        """A verified draft: update the sequence's average, pausing its drafts when it falls too low."""
        history = self.history.setdefault(request_id, _Acceptance())
        history.average += SMOOTHING * (num_accepted / num_draft_tokens - history.average)
        if history.average >= self.floor:
            history.pause = FIRST_PAUSE_STEPS
            return
        history.resume_at = history.step + history.pause + 1  # `pause` steps without drafts
        history.pause = min(2 * history.pause, MAX_PAUSE_STEPS)
        history.average = self.floor  # on resuming, one good draft lifts it above the floor again

    def free(self, request_id: str) -> None:
        self.history.pop(request_id, None)
