"""Prompt lookup ("n-gram") drafts: find the latest earlier occurrence of the sequence's last n tokens
(n from `prompt_lookup_max` down to `prompt_lookup_min`) in its prompt and output so far, and propose
the tokens that followed it. Code editing and retrieval answers repeat their prompt, so the target
often agrees with whole runs of these drafts.

It runs for every running sequence every step, so each sequence keeps an incremental index (n-gram ->
where its latest occurrence ends): a step costs O(new tokens x n-gram sizes) dictionary updates, not a
scan of the context."""

from __future__ import annotations

from app.config import SpeculativeConfig


class NgramIndex:
    """One sequence's tokens and, for each n in [min_n, max_n], where each n-gram's latest occurrence ends."""

    def __init__(self, min_n: int, max_n: int):
        self.sizes = range(max_n, min_n - 1, -1)  # longest first: a longer match predicts better
        self.tokens: list[int] = []
        self.num_prompt = 0
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its latest occurrence
        self.indexed = 0  # every n-gram ending at or before this position is in `ends`

    def sync(self, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Catch up with the sequence's tokens (they only ever grow)."""
        if not self.tokens:
            self.tokens.extend(prompt_ids)
            self.num_prompt = len(prompt_ids)
        self.tokens.extend(output_ids[len(self.tokens) - self.num_prompt :])

    def propose(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest matching suffix;
        [] when no suffix of an allowed size occurred before."""
        tokens, length = self.tokens, len(self.tokens)
        self._index_until(length - 1)  # not the suffix itself: its own occurrence ends at `length`
        for n in self.sizes:
            if n > length:
                continue
            end = self.ends.get(tuple(tokens[length - n :]))
            if end is not None:
                return _continue_from(tokens, end, k)
        return []

    def _index_until(self, last_end: int) -> None:
        tokens, sizes = self.tokens, self.sizes
        for end in range(self.indexed + 1, last_end + 1):
            for n in sizes:
                if n <= end:
                    self.ends[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, last_end)


def _continue_from(tokens: list[int], start: int, k: int) -> list[int]:
    """The k tokens that follow `start` if the text goes on as it did there. When the copy reaches the
    end of the text it copies its own drafts: a run that repeats with period p keeps repeating."""
    length, draft = len(tokens), []
    for pos in range(start, start + k):
        draft.append(tokens[pos] if pos < length else draft[pos - length])
    return draft


class NgramProposer:
    """Drafts for many sequences, each with its index kept between steps (dropped by `free`)."""

    def __init__(self, config: SpeculativeConfig):
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self.indexes: dict[str, NgramIndex] = {}

    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        """seqs: anything with request_id, prompt_ids, output_ids (engine Sequences); ks: the most draft
        tokens each may take (0: none). Returns each sequence's draft, possibly shorter, possibly []."""
        drafts = []
        for seq, k in zip(seqs, ks):
            if k <= 0:
                drafts.append([])
                continue
            index = self.indexes.get(seq.request_id)
            if index is None:
                index = self.indexes[seq.request_id] = NgramIndex(self.min_n, self.max_n)
            index.sync(seq.prompt_ids, seq.output_ids)
            drafts.append(index.propose(k))
        return drafts

    def free(self, request_id: str) -> None:
        self.indexes.pop(request_id, None)
