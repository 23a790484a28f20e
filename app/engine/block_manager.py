"""The paged KV cache's bookkeeping: which fixed-size blocks each sequence holds, and the prefix cache.

A sequence holds a block table (`seq.block_ids`): token position p lives in block
`block_ids[p // block_size]` at offset `p % block_size` of the runner's pool (model_runner.py). A
request is admitted only when its prompt's blocks are free; a running sequence that needs a new
block when none is free causes a preemption (see scheduler).

Prefix cache: every full prompt block is registered under a chain hash of its tokens (block i's hash
covers blocks 0..i). A later prompt that starts with the same blocks shares them (a reference count,
no copy), so a long system prompt is computed once. The chain starts from the sequence's LoRA adapter
(its identity; 0 for the base model): the same tokens under another adapter have other K/V, so blocks
are never shared across adapters. A freed block keeps its contents and hash while
it waits in the free list, oldest freed reused first: cached prefixes live in otherwise idle memory
and cost no capacity.
"""

from __future__ import annotations

from collections import OrderedDict

from app.engine.sequence import Sequence


def _chain_seed(seq) -> int:
    """The prefix chain's first link: the adapter's identity, or 0 for the base model (and for the
    draft model's shadow sequences, which have no adapter)."""
    lora = getattr(seq, "lora", None)
    return 0 if lora is None else hash(("lora", lora.uid))


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest freed first
        self.ref_counts = [0] * num_blocks
        self.block_hash: dict[int, int] = {}  # block -> chain hash of its tokens, for registered blocks
        self.cached: dict[int, int] = {}  # chain hash -> block holding those tokens
        self.prefix_queries = 0  # blocks looked up
        self.prefix_hits = 0  # blocks found

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def can_allocate(self, num_tokens: int) -> bool:
        # +1: room for the first generated token without an immediate preemption. Conservative: blocks
        # shared from the prefix cache would need fewer.
        return _blocks_for(num_tokens + 1, self.block_size) <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` its block table: shared cached blocks for its longest cached prefix, fresh ones
        after it. Sets `seq.num_cached` to the tokens whose K/V are already there."""
        # a prompt being scored computes every position, so it shares no cached block
        shared = [] if seq.scores_prompt else self._match_prefix(seq.token_ids, _chain_seed(seq))
        for block in shared:
            self.free.pop(block, None)
            self.ref_counts[block] += 1
        fresh = _blocks_for(seq.num_tokens + 1, self.block_size) - len(shared)
        seq.block_ids = shared + [self._take_free() for _ in range(fresh)]
        seq.num_cached = len(shared) * self.block_size

    def register_prefix(self, seq: Sequence) -> None:
        """After its prefill: make `seq`'s full prompt blocks findable by later prompts."""
        if not self.enable_prefix_caching:
            return
        full = len(seq.prompt_ids) // self.block_size
        for block, h in zip(seq.block_ids, self._chain_hashes(seq.prompt_ids, full, _chain_seed(seq))):
            if h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_ids) * self.block_size > seq.num_tokens or bool(self.free)

    def append(self, seq: Sequence) -> None:
        if len(seq.block_ids) * self.block_size <= seq.num_tokens:
            seq.block_ids.append(self._take_free())

    def reserve(self, seq: Sequence, lookahead: int) -> int:
        """Speculative decoding: blocks for `lookahead` positions past the one a decode writes, taken only
        from free blocks (a draft never preempts anyone). Returns how many of them are covered. Rejected
        positions need no trimming: the next step writes them again, and extra blocks go back with the
        sequence's others (finish, preemption); they lie past its prompt, so never in the prefix cache."""
        while len(seq.block_ids) * self.block_size < seq.num_tokens + lookahead and self.free:
            seq.block_ids.append(self._take_free())
        return max(0, min(lookahead, len(seq.block_ids) * self.block_size - seq.num_tokens))

    def deallocate(self, seq: Sequence) -> None:
        # reversed: a sequence's last blocks are the least likely to be shared, so they are reused first
        for block in reversed(seq.block_ids):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_ids = []
        seq.num_cached = 0

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash.pop(block, None)
        if h is not None:  # its old contents are about to be overwritten
            del self.cached[h]
        self.ref_counts[block] = 1
        return block

    def _chain_hashes(self, token_ids: list[int], num_blocks: int, seed: int) -> list[int]:
        hashes, h, bs = [], seed, self.block_size
        for i in range(num_blocks):
            h = hash((h, tuple(token_ids[i * bs : (i + 1) * bs])))
            hashes.append(h)
        return hashes

    def _match_prefix(self, token_ids: list[int], seed: int) -> list[int]:
        """Blocks holding the longest cached run of full blocks, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching:
            return []
        usable = (len(token_ids) - 1) // self.block_size
        blocks = []
        for h in self._chain_hashes(token_ids, usable, seed):
            self.prefix_queries += 1
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        self.prefix_hits += len(blocks)
        return blocks
