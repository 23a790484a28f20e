"""Verification: the target model scored `[last token, d1..dk]` for a sequence in one forward, giving
k+1 rows of logits (row j predicts the token after d_j). Which draft tokens stand, and which token
follows them?

- Greedy: the longest prefix of the draft that equals the target's own argmax, then the target's
  argmax after it (the correction, or the bonus token when all k stand). Exactly plain decoding.
- Sampled: rejection sampling (Leviathan et al. 2023; vLLM's RejectionSampler): d_j stands with
  probability min(1, p(d_j) / q(d_j)); the first that falls is replaced by a draw from
  normalize(max(0, p - q)); when all stand, a bonus token is drawn from p. The emitted tokens are
  distributed exactly as plain sampling from p. Drafts without probabilities (n-gram, greedy draft
  model) have q one-hot at the drafted token.

Row j is processed exactly as the plain sampler processes a decode row (app/engine/sampler.py:
penalties and min_tokens over the tokens *as they would stand after d_1..d_j*, then temperature,
top-k, min-p, top-p), so p is the distribution plain decoding would sample from at that position.

Randomness: k+1 uniforms per sequence per step, from the sequence's own generator when it has a seed
(so its output does not depend on the batch), drawn on the CPU whatever the device (the same values on
CPU and GPU); tokens are drawn by inverse CDF from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.engine.sampler import prepare_row, probabilities


@dataclass
class Verdict:
    tokens: list[int]  # the draft tokens that stood, then the target's own token: 1 to k+1 tokens
    num_accepted: int  # how many draft tokens stood


class _Drafted:
    """A sequence as it would stand after its first draft tokens: what the sampler's row controls read."""

    def __init__(self, seq, drafted: list[int]):
        self.seq, self.drafted = seq, drafted
        self.params, self.eos_ids, self.matcher = seq.params, seq.eos_ids, None
        self.output_ids = seq.output_ids + drafted

    @property
    def token_ids(self) -> list[int]:  # read only for a repetition penalty
        return self.seq.token_ids + self.drafted


def verify(logits: torch.Tensor, seqs: list, drafts: list[list[int]],
           draft_probs: list[torch.Tensor | None] | None = None) -> tuple[list[Verdict | None], dict[int, Exception]]:
    """logits: the target's raw logits [sum(len(d) + 1 for d in drafts), vocab], sequence i's k_i + 1
    rows in order (edited in place: keep a copy for log-probs). draft_probs[i]: [k_i, vocab] q, or None
    (one-hot). Every draft must be non-empty and no sequence guided: those decode plainly (sampler.sample).
    Returns (a verdict per sequence, None where it failed; the failed sequences' errors), as sample() does."""
    starts = _row_starts(drafts)
    failed: dict[int, Exception] = {}
    for i, (seq, draft) in enumerate(zip(seqs, drafts)):
        if not draft or seq.matcher is not None:
            raise ValueError(f"{seq.request_id}: only unguided sequences with a draft are verified")
        try:
            _process_rows(logits, starts[i], seq, draft)
        except Exception as e:
            failed[i] = e
    verdicts: list[Verdict | None] = [None] * len(seqs)
    greedy = [i for i, seq in enumerate(seqs) if seq.params.greedy and i not in failed]
    if greedy:
        rows = torch.cat([torch.arange(starts[i], starts[i] + len(drafts[i]) + 1) for i in greedy])
        best = logits[rows.to(logits.device)].argmax(dim=-1).tolist()
        at = 0
        for i in greedy:
            verdicts[i] = greedy_verdict(drafts[i], best[at : at + len(drafts[i]) + 1])
            at += len(drafts[i]) + 1
    for i, seq in enumerate(seqs):
        if seq.params.greedy or i in failed:
            continue
        k = len(drafts[i])
        probs = probabilities(logits[starts[i] : starts[i] + k + 1], [seq.params] * (k + 1))
        if not bool((torch.isfinite(probs).all() & (probs.sum(dim=-1) > 0).all())):
            failed[i] = ValueError("the sampling controls left no valid probability distribution")
            continue
        q = None if draft_probs is None else draft_probs[i]
        verdicts[i] = rejection_sample(probs, drafts[i], q, seq.generator)
    return verdicts, failed


def _row_starts(drafts: list[list[int]]) -> list[int]:
    starts, at = [], 0
    for draft in drafts:
        starts.append(at)
        at += len(draft) + 1
    return starts


def _process_rows(logits: torch.Tensor, start: int, seq, draft: list[int]) -> None:
    """Penalties and min_tokens for each of the sequence's k+1 rows, as the sampler would apply them at
    that position (nothing to do for most requests: no penalties, min_tokens reached)."""
    p = seq.params
    min_tokens_left = not p.ignore_eos and len(seq.output_ids) < p.min_tokens
    if not (p.needs_penalties or min_tokens_left):
        return
    for j in range(len(draft) + 1):
        prepare_row(logits, start + j, _Drafted(seq, draft[:j]))


def greedy_verdict(draft: list[int], target: list[int]) -> Verdict:
    """target: the target's argmax at each of the k+1 positions."""
    accepted = 0
    while accepted < len(draft) and draft[accepted] == target[accepted]:
        accepted += 1
    return Verdict(draft[:accepted] + [target[accepted]], accepted)


def rejection_sample(p: torch.Tensor, draft: list[int], q: torch.Tensor | None,
                     generator: torch.Generator | None) -> Verdict:
    """p: [k+1, vocab] the target's probabilities; q: [k, vocab] the draft's (None: one-hot at the draft)."""
    k = len(draft)
    uniforms = torch.rand(k + 1, generator=generator, dtype=torch.float64)  # CPU: same stream on any device
    positions = torch.arange(k, device=p.device)
    drafted = torch.tensor(draft, device=p.device)
    p_draft = p[positions, drafted].double().cpu()
    q_draft = torch.ones(k, dtype=torch.float64) if q is None else q[positions, drafted].double().cpu()
    stands = uniforms[:k] * q_draft < p_draft  # u < p/q, without dividing by q
    accepted = int(stands.long().cumprod(0).sum())
    if accepted == k:
        dist = p[k]
    else:
        dist = p[accepted] - (q[accepted] if q is not None else _one_hot(draft[accepted], p[accepted]))
        dist = dist.clamp(min=0)
        if not bool(dist.sum() > 0):  # p == q up to rounding: then the draft token stood with probability 1
            dist = p[accepted]
    token = _inverse_cdf(dist, float(uniforms[k]))
    return Verdict(draft[:accepted] + [token], accepted)


def _one_hot(token: int, like: torch.Tensor) -> torch.Tensor:
    hot = torch.zeros_like(like)
    hot[token] = 1.0
    return hot


def _inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """The token whose cumulative weight first exceeds u x total (weights need not be normalized)."""
    cdf = weights.double().cumsum(0)
    token = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64,
                                                      device=cdf.device), right=True))
    if token >= weights.shape[0]:  # u x total rounded up to the total: the last token with any weight
        token = int(torch.nonzero(weights).max())
    return token
