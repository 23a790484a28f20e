"""Decides, each step, which sequences run: admit waiting ones (a prefill step) while slots, blocks
and the prefill token budget allow, otherwise decode every running sequence. When a running
sequence needs a KV block and none is free, the newest one is preempted: its blocks are freed and
it goes back to the front of the queue, to be recomputed (from the prefix cache where it can).
Running order is admission order, so the newest is last."""

from __future__ import annotations

from collections import deque

from app.engine.block_manager import BlockManager
from app.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_prefill_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences, is_prefill)."""
        admitted, budget = [], self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if admitted and (seq.num_tokens > budget or seq.scores_prompt or admitted[0].scores_prompt):
                break  # a prompt being scored prefills alone, in chunks (engine._prefill_scored)
            if not self.blocks.can_allocate(seq.num_tokens):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget -= seq.num_tokens
        if admitted:
            return admitted, True
        for seq in list(self.running):
            while not self.blocks.can_append(seq):
                self.preempt(self.running[-1])
                if seq.status != SequenceStatus.RUNNING:
                    break
            if seq.status == SequenceStatus.RUNNING:
                self.blocks.append(seq)
        return list(self.running), False

    def preempt(self, seq: Sequence) -> None:
        self.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        self.blocks.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
