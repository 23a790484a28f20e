"""Runs the Hugging Face model over a batch of sequences with Conduit's own KV cache.

The model is any `AutoModelForCausalLM`; we only supply (a) a cache object whose `update()` the
attention layers call, and (b) a prepared 4-D attention mask, which transformers passes through
unchanged. So every architecture that uses the standard cache protocol runs here unmodified.

KV layout: one contiguous row ("slot") per running sequence, `[slot, kv_head, position, head_dim]`,
and running sequences always occupy slots 0..R-1. A decode step then attends over a plain view
`k[:R, :, :max_len]`: no gather, no copy. The alternative, a block pool gathered into a padded
batch every step, is measured by bench/kv_layout.py: on the 2-core CPU with the demo model at
batch 32 and ~100-token contexts, the gather alone took 2.4 ms against a 13.5 ms decode step
(+18%). So blocks are kept for accounting and for the prefix
cache (block_manager.py), and bytes stay contiguous. When a sequence leaves, the last slot's row is
moved into its place (one copy of one sequence, once).
"""

from __future__ import annotations

import inspect

import torch

from app.engine.sequence import Sequence


class SlotKVCache:
    """The object transformers' attention layers call `update()` on. Buffers are allocated on first
    use, from the shapes the model really produces (so head counts and dims need no config lookup)."""

    def __init__(self, num_slots: int, max_len: int, num_prefix_entries: int, block_size: int):
        self.num_slots, self.max_len = num_slots, max_len
        self.num_prefix_entries, self.block_size = num_prefix_entries, block_size
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.prefix_k: dict[int, torch.Tensor] = {}
        self.prefix_v: dict[int, torch.Tensor] = {}
        self._plan = None  # set by the runner before each forward

    def _buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            _, heads, _, dim = like.shape
            # zeros, not empty: masked keys still enter softmax(QK)V as 0 * V, and 0 * NaN is NaN
            shape = (self.num_slots, heads, self.max_len, dim)
            self.k[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            pshape = (self.num_prefix_entries, heads, self.block_size, dim)
            self.prefix_k[layer] = torch.zeros(pshape, dtype=like.dtype, device=like.device)
            self.prefix_v[layer] = torch.zeros(pshape, dtype=like.dtype, device=like.device)
        return self.k[layer], self.v[layer]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self._buffers(layer_idx, key_states)
        first, count, kv_len, decode_positions, prefill_writes = self._plan
        if decode_positions is not None:  # one new token per row, at that row's next position
            slots = torch.arange(first, first + count, device=k.device)
            k[slots, :, decode_positions] = key_states[:, :, 0]
            v[slots, :, decode_positions] = value_states[:, :, 0]
        else:  # row i's real tokens (left-padded) go to positions [start, start + n) of its slot
            q = key_states.shape[2]
            for i, (start, n) in enumerate(prefill_writes):
                k[first + i, :, start : start + n] = key_states[i, :, q - n :]
                v[first + i, :, start : start + n] = value_states[i, :, q - n :]
        return k[first : first + count, :, :kv_len], v[first : first + count, :, :kv_len]

    def move_slot(self, src: int, dst: int, length: int) -> None:
        for layer in self.k:
            self.k[layer][dst, :, :length] = self.k[layer][src, :, :length]
            self.v[layer][dst, :, :length] = self.v[layer][src, :, :length]

    def save_prefix(self, slot: int, block: int, entry: int) -> None:
        a, b = block * self.block_size, (block + 1) * self.block_size
        for layer in self.k:
            self.prefix_k[layer][entry] = self.k[layer][slot, :, a:b]
            self.prefix_v[layer][entry] = self.v[layer][slot, :, a:b]

    def load_prefix(self, slot: int, entries: list[int]) -> None:
        if not entries:
            return
        idx = torch.tensor(entries, device=next(iter(self.k.values())).device)
        n = len(entries) * self.block_size
        for layer in self.k:
            heads, dim = self.k[layer].shape[1], self.k[layer].shape[3]
            # [E, H, bs, D] -> [H, E*bs, D]
            self.k[layer][slot, :, :n] = self.prefix_k[layer][idx].transpose(0, 1).reshape(heads, n, dim)
            self.v[layer][slot, :, :n] = self.prefix_v[layer][idx].transpose(0, 1).reshape(heads, n, dim)


class ModelRunner:
    def __init__(self, model, max_num_seqs: int, max_model_len: int, block_size: int, num_prefix_entries: int):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.cache = SlotKVCache(max_num_seqs, max_model_len, num_prefix_entries, block_size)
        # transformers 5 renamed `past_key_values` to `cache`; models not yet migrated take the old name
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=mask,
            **{self.cache_kwarg: self.cache},
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Compute each sequence's uncached tokens (slots must be consecutive); returns last-token logits."""
        first = seqs[0].slot
        todo = [seq.token_ids[seq.num_cached :] for seq in seqs]
        q = max(len(t) for t in todo)
        kv_len = max(seq.num_tokens for seq in seqs)
        input_ids = torch.zeros((len(seqs), q), dtype=torch.long)
        positions = torch.zeros((len(seqs), q), dtype=torch.long)
        mask = torch.zeros((len(seqs), 1, q, kv_len), dtype=torch.bool)
        mask[:, :, :, 0] = True  # padding rows attend somewhere, so they stay finite
        keys = torch.arange(kv_len)
        writes = []
        for i, (seq, toks) in enumerate(zip(seqs, todo)):
            n, start = len(toks), seq.num_cached
            input_ids[i, q - n :] = torch.tensor(toks)
            pos = torch.arange(start, start + n)
            positions[i, q - n :] = pos
            mask[i, 0, q - n :] = keys[None, :] <= pos[:, None]
            writes.append((start, n))
        self.cache._plan = (first, len(seqs), kv_len, None, writes)
        return self._forward(input_ids.to(self.device), positions.to(self.device), mask.to(self.device))

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each running sequence; `seqs[i]` must sit in slot i."""
        positions = torch.tensor([seq.num_tokens - 1 for seq in seqs])
        kv_len = int(positions.max()) + 1
        mask = (torch.arange(kv_len)[None, :] <= positions[:, None])[:, None, None, :]
        input_ids = torch.tensor([[seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1]] for seq in seqs])
        positions = positions.to(self.device)
        self.cache._plan = (0, len(seqs), kv_len, positions, None)
        return self._forward(input_ids.to(self.device), positions[:, None], mask.to(self.device))
