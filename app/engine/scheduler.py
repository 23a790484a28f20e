"""Decides, each step, which sequences run: admit waiting ones while slots, blocks and the step's
token budget allow, and decode every running sequence. Both go in one forward (a mixed step) when
the admitted prompts and one token per running sequence fit the budget; a prompt too long for that,
a prompt being scored, and an engine that speculates (`mix_decodes` False) prefill in a step of
their own while the running sequences wait. A prefill step on its own stalled every stream for as
long as it took (~35-40 ms for ~6 prompts on this machine's CPU, against ~22 ms for a decode step
of 32), at every admission.

Who is admitted first (docs/qos.md):
- Priority classes (app/qos.py): a waiting sequence of a better class goes before any of a worse
  one. A worse class still runs whenever the better ones leave slots free.
- Fair share within a class: the API key (tenant) holding the fewest running slots per unit of
  weight goes next, so slots, and each prefill step's token budget, are shared by weight among the
  keys that wait. One key's own sequences go by (priority, arrival).
- Borrowed slots: when every slot is taken, a waiting sequence that is owed one (a better class
  than one running, or its key below its share of the class's slots while another key is over its
  own) is admitted at once into one of `max_num_seqs // 8` extra slots (at least 1), instead of
  waiting for a preemption. The batch then shrinks back by attrition: no one else is admitted until
  it is under `max_num_seqs` again. A sequence over the cap costs a decode step little, while a
  preemption costs its victim a recompute and everyone a second prefill step. When the borrowed
  slots are taken, preemption (below) brings the batch back within `max_num_seqs`.
- Preemption: a running sequence loses its blocks and goes back to the queue, to be recomputed
  (from the prefix cache where it can). Causes: `kv_cache` (a running sequence needs a block and none
  is free: the worst class's newest sequence goes), `priority` (a sequence of a better class has
  waited `preempt_after_s` with the borrowed slots taken: a worse class's newest goes, until the
  batch is within `max_num_seqs` again),
  `fair_share` (a key below its share of its class's slots has waited as long: the newest of the key
  most over its share goes, only while that key stays at or above its share, so two keys never trade
  a slot back and forth).

LoRA (docs/lora.md): a sequence with an adapter is admitted only with its adapter's slot pinned
(app/engine/lora/slots.py), until it leaves the batch. When every slot is pinned by other adapters it
is passed over, waiting in the queue, and the sequences behind it go first.

Other threads (the replica's event loop, the metrics poller) read only counters kept up to date
here (`queue_full`, `load`, `lora_waiting`), never the queues themselves."""

from __future__ import annotations

import bisect
import itertools
import time
from collections import Counter

from app.engine.block_manager import BlockManager
from app.engine.lora.slots import LoraSlots
from app.engine.sequence import Sequence, SequenceStatus
from app.qos import CLASSES

PREEMPTION_CAUSES = ("kv_cache", "priority", "fair_share")


def borrowed_slots(max_num_seqs: int) -> int:
    """Slots over `max_num_seqs` that sequences owed a slot may borrow (see the module's docstring)."""
    return max(1, max_num_seqs // 8)


def _queue_order(seq: Sequence) -> tuple[int, int]:
    return seq.priority, seq.order


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_prefill_tokens: int,
                 weights: dict[str, float] | None = None, preempt_after_s: float = 0.05, clock=time.monotonic,
                 loras: LoraSlots | None = None, mix_decodes: bool = True):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.borrowed_slots = borrowed_slots(max_num_seqs)
        self.max_prefill_tokens = max_prefill_tokens
        self.weights = dict(weights or {})
        self.preempt_after_s = preempt_after_s
        self.clock = clock
        # waiting sequences by class rank, then tenant; each list sorted by (priority, arrival)
        self.queues: list[dict[str, list[Sequence]]] = [{} for _ in CLASSES]
        self.running: list[Sequence] = []  # admission order
        self.num_waiting = 0
        self.waiting_by_class = [0] * len(CLASSES)
        self.tenant_waiting: dict[str, int] = {}
        self.tenant_work: dict[str, int] = {}  # waiting + running, per tenant with any
        self.active_weight = 0.0  # the weights of the tenants in tenant_work, summed
        self.tenants_seen: set[str] = set()  # every tenant that ever sent work here (API keys: a bounded set)
        self.preemptions = dict.fromkeys(PREEMPTION_CAUSES, 0)
        self.loras = loras
        self.mix_decodes = mix_decodes
        self.lora_waiting: Counter = Counter()  # waiting sequences by adapter name
        self._arrivals = itertools.count()

    @property
    def num_preemptions(self) -> int:
        return sum(self.preemptions.values())

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def add(self, seq: Sequence) -> None:
        seq.order = next(self._arrivals)
        self.tenants_seen.add(seq.tenant)
        self._count_work(seq.tenant, +1)
        self._enqueue(seq)

    def has_work(self) -> bool:
        return bool(self.num_waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], int]:
        """(the step's sequences, how many of them, first, prefill: the rest decode one token each)."""
        admitted = []
        if self.num_waiting:
            preempted = self._preempt_for_waiting()
            decodes = len(self.running) if self.mix_decodes else 0
            admitted = self._admit(borrow=not preempted, budget=self.max_prefill_tokens - decodes)
            prefill_tokens = sum(seq.num_tokens - seq.num_cached for seq in admitted)
            if admitted and (not self.mix_decodes or admitted[0].scores_prompt
                             or prefill_tokens + decodes > self.max_prefill_tokens):
                return admitted, len(admitted)
        decoding = self._append_slots(skip=set(admitted))
        admitted = [seq for seq in admitted if seq.status == SequenceStatus.RUNNING]  # not preempted meanwhile
        return admitted + decoding, len(admitted)

    def _append_slots(self, skip: set[Sequence]) -> list[Sequence]:
        """The running sequences outside `skip`, each with room for its next token; a block none can
        get is taken from the worst class's newest sequence, preempted."""
        for seq in list(self.running):
            # preempted earlier in this loop, or just admitted (its blocks hold its next token already)
            if seq.status != SequenceStatus.RUNNING or seq in skip:
                continue
            while not self.blocks.can_append(seq):
                victim = max(self.running, key=lambda s: (s.rank, s.order))  # the worst class's newest
                self.preempt(victim, "kv_cache")
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                self.blocks.append(seq)
        return [seq for seq in self.running if seq not in skip]

    def preempt(self, seq: Sequence, cause: str) -> None:
        self.running.remove(seq)
        self._unpin(seq)
        self.blocks.deallocate(seq)
        self.preemptions[cause] += 1
        self._enqueue(seq)

    def remove(self, seq: Sequence) -> None:
        """A sequence that finished, failed or was aborted leaves (a second call does nothing)."""
        self.blocks.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)
            self._unpin(seq)
        elif seq in self.queues[seq.rank].get(seq.tenant, ()):
            self._dequeue(seq)
        else:
            return
        self._count_work(seq.tenant, -1)

    # admission control, read from the replica's event loop ----------------------------------------
    def queue_full(self, tenant: str, max_waiting: int, arriving: int = 0, arriving_total: int = 0) -> str | None:
        """Why one more request of `tenant` is refused, or None. Per key first: a key may hold its
        weighted share of `max_waiting` (among the keys with work here, itself included), so a key
        that floods fills its own share, not everyone's. The whole replica refuses only past twice
        `max_waiting`, reachable only when many keys fill their shares in turn. `arriving` (of this
        tenant) and `arriving_total`: requests let in but not yet added; those the free batch slots
        will not take count as waiting."""
        weight = self.weight(tenant)
        active = self.active_weight + (0.0 if tenant in self.tenant_work else weight)
        share = max(1, int(max_waiting * weight / active))
        free_slots = max(0, self.max_num_seqs - len(self.running) - self.num_waiting)
        waiting = self.tenant_waiting.get(tenant, 0) + max(0, arriving - free_slots)
        arriving_total = max(0, arriving_total - free_slots)
        if waiting >= share:
            if share >= max_waiting:  # no other key has work here: its share is the whole queue
                return "The model's queue is full; retry shortly."
            return f"This API key's share of the model's queue is full ({waiting} requests waiting); retry shortly."
        if self.num_waiting + arriving_total >= 2 * max_waiting:
            return "The model's queue is full; retry shortly."
        return None

    def load(self) -> dict:
        """Running and waiting sequences per class and per tenant, and preemptions per cause."""
        running = list(self.running)  # copies: the engine thread changes these meanwhile
        return {
            "running_by_class": dict(Counter(CLASSES[s.rank] for s in running)),
            "waiting_by_class": dict(zip(CLASSES, list(self.waiting_by_class))),
            "running_by_key": dict(Counter(s.tenant for s in running)),
            "waiting_by_key": dict(self.tenant_waiting),
            "keys_seen": sorted(self.tenants_seen),
            "preemptions_by_cause": dict(self.preemptions),
        }

    # admission -----------------------------------------------------------------------------------
    def _admit(self, borrow: bool, budget: int) -> list[Sequence]:
        """`borrow`: whether owed sequences may take borrowed slots (not in a step that preempted to
        bring the batch back within the cap, or the slots just given back would be borrowed again);
        `budget`: prompt tokens the step has room for (the first prompt is admitted whatever its length)."""
        admitted = []
        cap = self.max_num_seqs + (self.borrowed_slots if borrow else 0)
        over_budget: set[str] = set()  # tenants whose next prompt does not fit this step's budget
        no_slot: set[Sequence] = set()  # waiting for an adapter slot (every slot pinned by others)
        running = self._running_slots()
        while len(self.running) < cap:
            seq = self._next_waiting(running, over_budget, no_slot)
            if seq is None or (admitted and admitted[0].scores_prompt):
                break  # a prompt being scored prefills alone, in chunks (engine._prefill_scored)
            if len(self.running) >= self.max_num_seqs and not self._owed_a_slot(seq, running):
                break
            if admitted and (seq.num_tokens > budget or seq.scores_prompt):
                over_budget.add(seq.tenant)
                continue
            if not self.blocks.can_allocate(seq.num_tokens):
                break
            if not self._pin(seq):
                no_slot.add(seq)
                continue
            self._dequeue(seq)
            self.blocks.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            running[seq.rank, seq.tenant] += 1
            admitted.append(seq)
            budget -= seq.num_tokens
        return admitted

    def _running_slots(self) -> Counter:
        return Counter((s.rank, s.tenant) for s in self.running)

    def _next_waiting(self, running: Counter, skip: set[str], passed: set[Sequence] = frozenset()) -> Sequence | None:
        """The head of the best class's fairest tenant: fewest running slots per weight, then the older
        head. None when that class has no tenant left outside `skip` (a worse class does not jump it).
        A sequence in `passed` (no adapter slot for it this step) does not count as a head."""
        for rank, tenants in enumerate(self.queues):
            if not tenants:
                continue
            heads = [head for tenant, queue in tenants.items()
                     if tenant not in skip and (head := _first_not_in(queue, passed)) is not None]
            if not heads:
                return None
            return min(heads, key=lambda s: (running[rank, s.tenant] / self.weight(s.tenant), s.priority, s.order))
        return None

    # preemption for a waiting sequence ---------------------------------------------------------------
    def _preempt_for_waiting(self) -> bool:
        """Whether it preempted."""
        running = self._running_slots()
        seq = self._next_waiting(running, set())
        if seq is None or self.clock() - seq.waiting_since < self.preempt_after_s:
            return False
        if seq.lora is not None and not self.loras.can_acquire(seq.lora):
            return False  # room would not admit it: it waits for a slot
        preempted = False
        # down to the cap, not to the borrowed slots: a key over its share then gives back the slots that
        # were borrowed from it, instead of keeping them until its sequences finish
        while not (len(self.running) < self.max_num_seqs and self.blocks.can_allocate(seq.num_tokens)):
            victim, cause = self._victim_for(seq, running)
            if victim is None:
                break
            self.preempt(victim, cause)
            running[victim.rank, victim.tenant] -= 1
            preempted = True
        return preempted

    def _owed_a_slot(self, seq: Sequence, running: Counter) -> bool:
        """Whether `seq` could preempt someone for its slot: then it may borrow one instead."""
        return self._victim_for(seq, running)[0] is not None

    def _victim_for(self, seq: Sequence, running: Counter) -> tuple[Sequence | None, str]:
        worse = [s for s in self.running if s.rank > seq.rank]
        if worse:
            return max(worse, key=lambda s: (s.rank, s.order)), "priority"
        share = self._slot_shares(seq.rank, running)
        if running[seq.rank, seq.tenant] + 1 > share[seq.tenant]:
            return None, ""  # it has its share already: it waits for a slot like anyone
        over = [t for t in share if t != seq.tenant and running[seq.rank, t] - 1 >= share[t]]
        if not over:
            return None, ""
        richest = max(over, key=lambda t: running[seq.rank, t] / self.weight(t))
        victims = [s for s in self.running if s.rank == seq.rank and s.tenant == richest]
        return max(victims, key=lambda s: s.order), "fair_share"

    def _slot_shares(self, rank: int, running: Counter) -> dict[str, float]:
        """Each tenant's weighted share of the slots class `rank` may use (those better classes do not hold)."""
        tenants = set(self.queues[rank]) | {t for (r, t), n in running.items() if r == rank and n > 0}
        slots = self.max_num_seqs - sum(n for (r, _), n in running.items() if r < rank)
        total = sum(self.weight(t) for t in tenants)
        return {t: slots * self.weight(t) / total for t in tenants}

    # bookkeeping ---------------------------------------------------------------------------------
    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        seq.waiting_since = self.clock()
        bisect.insort(self.queues[seq.rank].setdefault(seq.tenant, []), seq, key=_queue_order)
        self.num_waiting += 1
        self.waiting_by_class[seq.rank] += 1
        self.tenant_waiting[seq.tenant] = self.tenant_waiting.get(seq.tenant, 0) + 1
        if seq.lora is not None:
            self.lora_waiting[seq.lora.name] += 1

    def _dequeue(self, seq: Sequence) -> None:
        tenants = self.queues[seq.rank]
        tenants[seq.tenant].remove(seq)
        if not tenants[seq.tenant]:
            del tenants[seq.tenant]
        self.num_waiting -= 1
        self.waiting_by_class[seq.rank] -= 1
        _decrement(self.tenant_waiting, seq.tenant)
        if seq.lora is not None:
            _decrement(self.lora_waiting, seq.lora.name)

    def _pin(self, seq: Sequence) -> bool:
        """Its adapter's slot, pinned (installed first if need be); False when no slot can take it."""
        if seq.lora is not None:
            seq.lora_slot = self.loras.acquire(seq.lora)
            return seq.lora_slot is not None
        return True

    def _unpin(self, seq: Sequence) -> None:
        if seq.lora_slot is not None:
            self.loras.release(seq.lora_slot)
            seq.lora_slot = None

    def _count_work(self, tenant: str, change: int) -> None:
        before = self.tenant_work.get(tenant, 0)
        if before == 0:
            self.active_weight += self.weight(tenant)
        self.tenant_work[tenant] = before + change
        if before + change == 0:
            del self.tenant_work[tenant]
            self.active_weight -= self.weight(tenant)


def _first_not_in(queue: list[Sequence], passed: set[Sequence]) -> Sequence | None:
    return queue[0] if not passed else next((s for s in queue if s not in passed), None)


def _decrement(counts: dict[str, int], key: str) -> None:
    counts[key] -= 1
    if not counts[key]:
        del counts[key]
