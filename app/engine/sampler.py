"""Turns a batch of last-token logits into next tokens, each row with its own request's controls.

Rows never influence each other: penalties read only that row's tokens, and a seeded request draws
from its own `torch.Generator`, so its output does not depend on what else is in the batch."""

from __future__ import annotations

import torch

from app.engine.sequence import Sequence


def _apply_penalties(logits: torch.Tensor, seq: Sequence) -> None:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if seq.output_ids and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(seq.output_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > top_p  # keep the smallest set whose mass reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [batch, vocab] float32, row i for seqs[i]."""
    for i, seq in enumerate(seqs):
        if seq.params.needs_penalties:
            _apply_penalties(logits[i], seq)
        if seq.matcher is not None:  # the grammar alone decides where a guided output may end
            seq.matcher.mask(logits[i : i + 1])
        elif not seq.params.ignore_eos and len(seq.output_ids) < seq.params.min_tokens:
            for eos in seq.eos_ids:
                logits[i, eos] = float("-inf")
    tokens = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        probs = _filter(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
        tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return tokens
