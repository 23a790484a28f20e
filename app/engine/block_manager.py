"""KV memory accounting in fixed-size blocks, and the prefix cache.

Every running sequence is charged one block per `block_size` tokens from a fixed budget; a request
is admitted only when its prompt's blocks are free, and a running sequence that needs a new block
when none is free causes a preemption (see scheduler). Full prompt blocks are also kept in a
prefix cache keyed by a chain hash of their tokens (block i's hash covers blocks 0..i), so a long
shared system prompt is computed once and copied, not recomputed, for later requests.

Where the K/V bytes live is the model runner's business (see model_runner.py for why sequences
keep contiguous slots); this class only decides how much may be used and which prefix blocks exist.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from app.engine.sequence import Sequence


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_prefix_blocks: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.prefix_index: OrderedDict[int, int] = OrderedDict()  # chain hash -> prefix pool entry, LRU order
        self.free_prefix_entries: list[int] = list(range(num_prefix_blocks))
        self.prefix_queries = 0  # blocks looked up
        self.prefix_hits = 0  # blocks found

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def can_allocate(self, num_tokens: int) -> bool:
        # +1: room for the first generated token without an immediate preemption
        return _blocks_for(num_tokens + 1, self.block_size) <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        for _ in range(_blocks_for(seq.num_tokens + 1, self.block_size)):
            seq.block_ids.append(self.free_blocks.popleft())

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_ids) * self.block_size > seq.num_tokens or bool(self.free_blocks)

    def append(self, seq: Sequence) -> None:
        if len(seq.block_ids) * self.block_size <= seq.num_tokens:
            seq.block_ids.append(self.free_blocks.popleft())

    def deallocate(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_ids)
        seq.block_ids.clear()

    # prefix cache ---------------------------------------------------------------------------
    def _chain_hashes(self, token_ids: list[int], num_blocks: int) -> list[int]:
        hashes, h, bs = [], 0, self.block_size
        for i in range(num_blocks):
            h = hash((h, tuple(token_ids[i * bs : (i + 1) * bs])))
            hashes.append(h)
        return hashes

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Prefix pool entries holding the longest cached run of full blocks, leaving >= 1 token to compute."""
        usable = (len(token_ids) - 1) // self.block_size
        entries = []
        for h in self._chain_hashes(token_ids, usable):
            self.prefix_queries += 1
            entry = self.prefix_index.get(h)
            if entry is None:
                break
            self.prefix_index.move_to_end(h)
            entries.append(entry)
        self.prefix_hits += len(entries)
        return entries

    def entries_to_store(self, token_ids: list[int]) -> list[tuple[int, int]]:
        """(block number, pool entry) for this prompt's full blocks not cached yet, evicting LRU entries."""
        full = len(token_ids) // self.block_size
        todo = []
        for i, h in enumerate(self._chain_hashes(token_ids, full)):
            if h in self.prefix_index:
                self.prefix_index.move_to_end(h)
                continue
            if not self.free_prefix_entries:
                if not self.prefix_index:
                    break
                _, evicted = self.prefix_index.popitem(last=False)
                self.free_prefix_entries.append(evicted)
            entry = self.free_prefix_entries.pop()
            self.prefix_index[h] = entry
            todo.append((i, entry))
        return todo
