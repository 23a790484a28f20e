"""The replica's fixed adapter slots: which adapter each holds, who is using it, and which goes when a
new one needs room.

A sequence pins its adapter's slot from admission until it leaves the running batch (finish, abort,
preemption). An adapter not in a slot is installed when a sequence using it is admitted (the engine
thread, between forwards): into a free slot, else over the least recently used unpinned one (an
eviction). When every slot is pinned by other adapters the sequence waits in the queue.

`unload` and `stats` may be called from any thread (the replica's event loop): the slot table is
changed under a lock, and the weights of a slot in use are never touched."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from app.engine.lora.adapter import LoraAdapter
from app.engine.lora.layer import LoraBatch, LoraLinear, LoraStep

RANK_ALIGN = 8  # grouped GEMM kernels want 16-byte aligned strides: ranks padded to 8 elements


class LoraSlots:
    def __init__(self, model: torch.nn.Module, num_slots: int, max_rank: int):
        import peft  # noqa: F401  (seconds to import: paid at start, not by the first adapter's request)

        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.rank = -(-max_rank // RANK_ALIGN) * RANK_ALIGN
        self.batch = LoraBatch()
        self.layers: dict[str, LoraLinear] = {}  # wrapped on first use, by module path
        self.held: list[LoraAdapter | None] = [None] * num_slots
        self.pins = [0] * num_slots
        self.recent: OrderedDict[int, None] = OrderedDict()  # occupied slots, least recently used first
        self.loads = 0
        self.evictions = 0
        self.lock = threading.Lock()

    # engine thread --------------------------------------------------------------------------------
    def acquire(self, adapter: LoraAdapter) -> int | None:
        """Pin `adapter`'s slot, installing it first if needed; None when every slot is pinned."""
        with self.lock:
            slot = self._slot_of(adapter)
            if slot is None:
                slot = self._room()
                if slot is None:
                    return None
                self._install(slot, adapter)
            self.pins[slot] += 1
            self.recent[slot] = None
            self.recent.move_to_end(slot)
            return slot

    def can_acquire(self, adapter: LoraAdapter) -> bool:
        with self.lock:
            return self._slot_of(adapter) is not None or self._room() is not None

    def release(self, slot: int) -> None:
        with self.lock:
            self.pins[slot] -= 1

    def plan(self, counts: list[int], slots: list[int | None]) -> None:
        """Group the next forward's packed tokens (`counts[i]` tokens of span i, using `slots[i]`)."""
        if all(s is None for s in slots):
            self.batch.current = None
            return
        token_slot = np.repeat(np.array([-1 if s is None else s for s in slots]), counts)
        lora = np.flatnonzero(token_slot >= 0)
        order = lora[np.argsort(token_slot[lora], kind="stable")]
        offs = np.cumsum(np.bincount(token_slot[lora], minlength=self.num_slots))
        device = next(iter(self.layers.values())).a.device
        self.batch.current = LoraStep(torch.from_numpy(order).to(device),
                                      torch.from_numpy(offs.astype(np.int32)).to(device),
                                      frozenset(s for s in slots if s is not None))

    def done(self) -> None:
        self.batch.current = None

    # any thread -----------------------------------------------------------------------------------
    def unload(self, name: str) -> bool:
        """Drop every idle slot holding an adapter named `name`; False when one is in use (it stays)."""
        with self.lock:
            slots = [s for s, adapter in enumerate(self.held) if adapter is not None and adapter.name == name]
            if any(self.pins[s] for s in slots):
                return False
            for slot in slots:
                self._clear(slot)
            return True

    def stats(self) -> dict:
        with self.lock:
            return {
                "running": sorted({self.held[s].name for s in range(self.num_slots) if self.pins[s]}),
                "loaded": [self.held[s].name for s in self.recent],
                "max_lora": self.num_slots,
                "loads": self.loads,
                "evictions": self.evictions,
            }

    # under the lock -------------------------------------------------------------------------------
    def _slot_of(self, adapter: LoraAdapter) -> int | None:
        return next((s for s, held in enumerate(self.held) if held is adapter), None)

    def _room(self) -> int | None:
        free = next((s for s, held in enumerate(self.held) if held is None), None)
        if free is not None:
            return free
        return next((s for s in self.recent if not self.pins[s]), None)

    def _install(self, slot: int, adapter: LoraAdapter) -> None:
        if self.held[slot] is not None:
            self.evictions += 1
            self._clear(slot)
        for module, weights in adapter.modules.items():
            self._layer(module).set_slot(slot, weights.a, weights.b, weights.scale)
        self.held[slot] = adapter
        self.loads += 1

    def _clear(self, slot: int) -> None:
        for module in self.held[slot].modules:
            self.layers[module].clear_slot(slot)
        self.held[slot] = None
        self.recent.pop(slot, None)

    def _layer(self, module: str) -> LoraLinear:
        """The wrapper around the model's Linear `module`, put in its place on first use (a wrapper left by
        an earlier engine over the same model object is replaced: its slots were that engine's)."""
        layer = self.layers.get(module)
        if layer is None:
            parent_name, _, child = module.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            base = getattr(parent, child)
            if isinstance(base, LoraLinear):
                base = base.base
            layer = LoraLinear(base, self.batch, self.num_slots, self.rank)
            setattr(parent, child, layer)
            self.layers[module] = layer
        return layer
