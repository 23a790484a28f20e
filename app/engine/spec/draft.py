"""Draft-model proposals: a smaller model with the target's tokenizer drafts k tokens greedily, with its
own paged KV cache on the same replica. It reuses the engine's pieces unchanged: a `ModelRunner` over the
draft model and a `BlockManager` over the draft's own blocks (with its own prefix cache), driven with a
shadow of each target sequence (`DraftSequence`: the same tokens, the draft's own block table).

Each step: one forward computes every drafting sequence's tokens the draft has not cached yet (the
target's last accepted tokens; the first step, its prompt) and gives d1; then k-1 batched one-token
decodes give d2..dk. The draft keeps its K/V for the draft tokens the target accepted; positions after
the first rejected one are recomputed next step (their rows are simply overwritten).

Drafts are greedy, so verification treats q as one-hot (a sampled request still gets exactly the target's
distribution; a draft sampled at the request's temperature would be accepted more often at high
temperature, at the cost of q's [k, vocab] probabilities per sequence)."""

from __future__ import annotations

import torch

from app.engine.block_manager import BlockManager
from app.engine.attention import ForwardSize
from app.engine.model_runner import ModelRunner


class DraftSequence:
    """The draft model's copy of one target sequence: what ModelRunner and BlockManager read."""

    scores_prompt = False  # the draft never scores a prompt

    def __init__(self, request_id: str, prompt_ids: list[int]):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []  # the target's output, then (while drafting) this step's draft
        self.block_ids: list[int] = []
        self.num_cached = 0
        self.pending: list[int] = []  # the last draft, whose first len-1 tokens' K/V are cached

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def sync(self, output_ids: list[int]) -> None:
        """Catch up with the target's output; keep the cached K/V of the draft tokens it accepted."""
        confirmed = len(self.output_ids)
        new = output_ids[confirmed:]
        cached_draft = self.pending[:-1]  # the last draft token was never fed to the draft model
        agreed = 0
        while agreed < min(len(cached_draft), len(new)) and cached_draft[agreed] == new[agreed]:
            agreed += 1
        self.pending = []
        self.output_ids.extend(new)
        # the last token is always fed again: the forward that reads it gives the next token's logits
        self.num_cached = min(self.num_cached, len(self.prompt_ids) + confirmed + agreed, self.num_tokens - 1)


class DraftModelProposer:
    def __init__(self, model, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, runner=None,
                 size: ForwardSize = ForwardSize()):
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.runner = runner or ModelRunner(model, num_blocks, block_size, size)
        self.shadows: dict[str, DraftSequence] = {}

    @torch.inference_mode()
    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        """seqs: engine Sequences (request_id, prompt_ids, output_ids); ks: the most draft tokens each may
        take. A sequence the draft's cache has no room for gets [] (it decodes plainly)."""
        new = {seq.request_id for seq in seqs if seq.request_id not in self.shadows}
        drafting = [(i, shadow, k) for i, (seq, k) in enumerate(zip(seqs, ks))
                    if k > 0 and (shadow := self._shadow(seq)) is not None]
        drafts: list[list[int]] = [[] for _ in seqs]
        if not drafting:
            return drafts
        shadows = [shadow for _, shadow, _ in drafting]
        starts = [shadow.num_tokens for shadow in shadows]
        logits = self.runner.prefill(shadows)  # each shadow's uncached tokens: the catch-up, and d1
        for shadow in shadows:
            shadow.num_cached = shadow.num_tokens
            if shadow.request_id in new:  # its prompt's K/V now exist: later prompts may share them
                self.blocks.register_prefix(shadow)
        self._extend(shadows, logits)
        for step in range(1, max(k for _, _, k in drafting)):
            more = [shadow for _, shadow, k in drafting if k > step and self._room(shadow)]
            if not more:
                break
            logits = self.runner.decode(more)
            for shadow in more:
                shadow.num_cached = shadow.num_tokens
            self._extend(more, logits)
        for (i, shadow, _), start in zip(drafting, starts):
            drafts[i] = shadow.output_ids[start - len(shadow.prompt_ids) :]
            del shadow.output_ids[start - len(shadow.prompt_ids) :]
            shadow.pending = drafts[i]
        return drafts

    def free(self, request_id: str) -> None:
        """The sequence finished, failed or was preempted: its draft blocks go back."""
        shadow = self.shadows.pop(request_id, None)
        if shadow is not None:
            self.blocks.deallocate(shadow)

    def _shadow(self, seq) -> DraftSequence | None:
        shadow = self.shadows.get(seq.request_id)
        if shadow is None:
            shadow = DraftSequence(seq.request_id, seq.prompt_ids)
            shadow.sync(seq.output_ids)
            if not self.blocks.can_allocate(shadow.num_tokens):
                return None
            self.blocks.allocate(shadow)
            self.shadows[seq.request_id] = shadow
            return shadow
        shadow.sync(seq.output_ids)
        return shadow if self._room(shadow) else None

    def _room(self, shadow: DraftSequence) -> bool:
        """Blocks for every token up to the one about to be drafted, taken now (False: none free)."""
        while len(shadow.block_ids) * self.blocks.block_size <= shadow.num_tokens:
            if not self.blocks.can_append(shadow):
                return False
            self.blocks.append(shadow)
        return True

    @staticmethod
    def _extend(shadows: list[DraftSequence], logits) -> None:
        for shadow, token in zip(shadows, logits.argmax(dim=-1).tolist()):
            shadow.output_ids.append(token)


def tokenizers_match(target, draft) -> str | None:
    """Why `draft`'s tokenizer cannot draft for `target`'s (None: it can). `conduit validate` reports it
    under engine.speculative.draft_model."""
    if target.get_vocab() != draft.get_vocab():
        return "the draft model's tokenizer has a different vocabulary from the target's"
    if target.eos_token_id != draft.eos_token_id:
        return f"the draft model's eos token id {draft.eos_token_id} differs from the target's {target.eos_token_id}"
    return None
