"""Log-probabilities of tokens, for requests that ask (`SamplingParams.logprobs` / `prompt_logprobs`).

Values are the model's raw log-softmax (before temperature, penalties, top-k/p or guided masks),
vLLM's default `raw_logprobs`, so they match a plain forward pass of the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Logprob:
    token_id: int
    token: str  # the token decoded on its own (wire formats take its UTF-8 bytes from it)
    logprob: float | None  # None only for a prompt's first token: nothing precedes it


@dataclass
class TokenLogprobs:
    """One position: the token that is there and the `k` most likely tokens, best first."""

    chosen: Logprob
    top: list[Logprob] = field(default_factory=list)


class TokenNames:
    """Each token id decoded on its own, cached (few ids recur across a replica's requests)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.names: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        name = self.names.get(token_id)
        if name is None:
            name = self.names[token_id] = self.tokenizer.decode([token_id])
        return name


def token_logprobs(logits: torch.Tensor, token_ids: list[int], ks: list[int], names: TokenNames) -> list[TokenLogprobs]:
    """logits: [rows, vocab] raw model logits; row i scored for `token_ids[i]` with `ks[i]` alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])[:, 0].tolist()
    most = min(max(ks), logprobs.shape[-1])  # never more alternatives than the vocabulary holds
    top_values, top_ids = logprobs.topk(most, dim=-1) if most > 0 else (None, None)
    result = []
    for i, (token_id, k) in enumerate(zip(token_ids, ks)):
        top = []
        if k > 0:
            top = [Logprob(t, names(t), v) for t, v in zip(top_ids[i, :k].tolist(), top_values[i, :k].tolist())]
        result.append(TokenLogprobs(Logprob(token_id, names(token_id), chosen[i]), top))
    return result

