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


def probabilities(logits: torch.Tensor, params: list) -> torch.Tensor:
    """[rows, vocab] logits -> probabilities, row i under params[i]'s temperature, top_k, min_p, top_p."""
    device = logits.device
    logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    vocab = logits.shape[-1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    if bool((top_k < vocab).any()):
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, (top_k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    if bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set whose mass reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], dict[int, Exception]]:
    """logits: [batch, vocab] float32, row i for seqs[i]. Returns (a token per row, the rows that could
    not be sampled and why). A row's own controls may fail it (say, probabilities that came out NaN);
    that fails the row alone, never its batch."""
    failed: dict[int, Exception] = {}
    for i, seq in enumerate(seqs):
        try:
            prepare_row(logits, i, seq)
        except Exception as e:
            failed[i] = e
    tokens = logits.argmax(dim=-1).tolist()
    # unseeded rows draw together in one call; a seeded row draws alone from its own generator, so its
    # output does not depend on the rest of the batch
    sampled = [i for i, seq in enumerate(seqs) if not seq.params.greedy and i not in failed]
    unseeded = [i for i in sampled if seqs[i].generator is None]
    draws = [(unseeded, _draw(logits[unseeded], [seqs[i].params for i in unseeded]))]
    draws += [([i], _draw(logits[i : i + 1], [seqs[i].params], seqs[i].generator))
              for i in sampled if seqs[i].generator is not None]
    for rows, drawn in draws:
        for i, token in zip(rows, drawn):
            if token is None:
                failed[i] = ValueError("the sampling controls left no valid probability distribution")
            else:
                tokens[i] = token
    return tokens, failed


def prepare_row(logits: torch.Tensor, i: int, seq: Sequence) -> None:
    if seq.params.needs_penalties:
        _apply_penalties(logits[i], seq)
    if seq.matcher is not None:  # the grammar alone decides where a guided output may end
        seq.matcher.mask(logits[i : i + 1])
    elif not seq.params.ignore_eos and len(seq.output_ids) < seq.params.min_tokens:
        for eos in seq.eos_ids:
            logits[i, eos] = float("-inf")


def _draw(logits: torch.Tensor, params: list, generator: torch.Generator | None = None) -> list[int | None]:
    """A token per row, None for a row whose probabilities are unusable (NaN, inf or all zero): found
    before the draw, because on CUDA multinomial would assert on it and take the device down."""
    if not params:
        return []
    probs = probabilities(logits, params)
    usable = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
    probs = torch.where(usable[:, None], probs, 1.0)
    drawn = torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()
    return [token if ok else None for token, ok in zip(drawn, usable.tolist())]
