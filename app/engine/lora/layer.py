"""The per-token grouped LoRA delta, wrapped around a target Linear (Punica's SGMV / S-LoRA semantics).

ModelRunner packs every sequence's new tokens into ONE row, so an adapter is chosen per token, not per
batch row (peft's `adapter_names` picks per row and cannot express this). For the tokens of slot s:

    y = base(x) + scale_s * (x @ A_s^T) @ B_s^T        (base-only tokens: y = base(x), untouched)

computed as two grouped GEMMs over the LoRA tokens sorted by slot (`torch.nn.functional.grouped_mm`,
PyTorch's own jagged grouped matmul, as MoE layers use it: one kernel call per factor however many
adapters share the step, on CPU and CUDA), then added back in place at the tokens' positions. The
scale is folded into B when the adapter is installed. A step without LoRA tokens calls base alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import grouped_mm


@dataclass(frozen=True)
class LoraStep:
    """One forward's grouping: the packed positions of LoRA tokens sorted by slot, where each slot's
    run ends (int32, one entry per slot, empty runs included), and the slots present."""

    order: torch.Tensor
    offs: torch.Tensor
    slots: frozenset[int]


class LoraBatch:
    """What the runner tells every wrapped layer about the forward in progress (None: no LoRA token)."""

    def __init__(self):
        self.current: LoraStep | None = None


class LoraLinear(torch.nn.Module):
    """`base` plus the delta of whichever slots' adapters target this module. Slot buffers are sized
    once (every slot at the padded max rank) and written in place when an adapter is installed."""

    @torch.inference_mode()  # the buffers are inference tensors, written in place whichever thread asks
    def __init__(self, base: torch.nn.Linear, batch: LoraBatch, num_slots: int, rank: int):
        super().__init__()
        self.base = base
        self.batch = batch
        weight = base.weight
        # A^T and scale * B^T per slot, zero past the adapter's rank: a zero row/column adds nothing
        self.register_buffer("a", weight.new_zeros(num_slots, base.in_features, rank), persistent=False)
        self.register_buffer("b", weight.new_zeros(num_slots, rank, base.out_features), persistent=False)
        self.filled: set[int] = set()  # slots whose adapter targets this module

    @torch.inference_mode()
    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Install factors A [rank, in], B [out, rank] into `slot` (engine thread, between forwards)."""
        rank = a.shape[0]
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :, :rank].copy_(a.T)
        self.b[slot, :rank].copy_(b.T * scale)
        self.filled.add(slot)

    @torch.inference_mode()
    def clear_slot(self, slot: int) -> None:
        if slot in self.filled:
            self.filled.discard(slot)
            self.a[slot].zero_()
            self.b[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        step = self.batch.current
        if step is None or self.filled.isdisjoint(step.slots):
            return out
        flat = x.reshape(-1, x.shape[-1])
        shrunk = grouped_mm(flat.index_select(0, step.order), self.a, offs=step.offs)  # [lora tokens, rank]
        delta = grouped_mm(shrunk, self.b, offs=step.offs)  # [lora tokens, out]
        out.view(-1, out.shape[-1]).index_add_(0, step.order, delta)
        return out
