"""Runs the Hugging Face model over a batch of sequences with Conduit's own paged KV cache.

The model is any `AutoModelForCausalLM`; we only supply (a) a cache object whose `update()` the
attention layers call, and (b) a prepared 4-D attention mask, which transformers passes through
unchanged. So every architecture that uses the standard cache protocol runs here unmodified.

KV layout: per layer, one pool of `num_blocks * block_size` token rows `[row, kv_head, head_dim]`;
a sequence's tokens sit in the blocks of its block table (block_manager.py). Each forward writes
the new tokens' K/V into their rows, then gathers every sequence's rows into the padded batch that
attention reads, with one `index_select` per layer and tensor (the row index is built once per step
and shared by all layers). Measured side by side on the 2-core CPU with the demo model, batch 32,
~100-token contexts (bench/kv_layout.py, and the same script at commit ca83952 for the layout this
engine used before: one contiguous row per sequence at max_model_len): a decode step takes ~9.2 ms
paged against ~7.9 ms contiguous, the gather itself ~1.2 ms of it. In exchange memory is held per
block actually used, not per sequence at max_model_len, so a replica admits as many sequences as
their real lengths fit, and a shared prefix is one set of blocks, never copied. Padding positions
read one spare zero block (masked out; zeros, not garbage, because masked keys still enter
softmax(QK)V as 0 * V).
"""

from __future__ import annotations

import inspect

import torch

from app.engine.sequence import Sequence


class PagedKVCache:
    """The object transformers' attention layers call `update()` on. Pools are allocated on first
    use, from the shapes the model really produces (so head counts and dims need no config lookup)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.pad_block = num_blocks  # the spare block that padding positions read
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self._plan = None  # (write rows, read rows, (batch, kv_len), real-token mask or None), per forward
        self._gather: tuple[torch.Tensor, torch.Tensor] | None = None  # see _scratch

    def plan(self, seqs: list[Sequence], num_new: list[int], device: torch.device,
             lengths: list[int] | None = None) -> None:
        """Before a forward: sequence i computes the `num_new[i]` tokens that end at `lengths[i]`
        (default: all its tokens; right-aligned in the input, left padding) and attends to all of them."""
        lengths = torch.tensor(lengths or [seq.num_tokens for seq in seqs])
        new = torch.tensor(num_new)
        kv_len = int(lengths.max())
        width = -(-kv_len // self.block_size)
        tables = torch.full((len(seqs), width), self.pad_block, dtype=torch.long)
        for i, seq in enumerate(seqs):
            blocks = seq.block_ids[:width]  # a sequence may hold one block ahead of its tokens
            tables[i, : len(blocks)] = torch.tensor(blocks)
        rows = (tables[:, :, None] * self.block_size + torch.arange(self.block_size)).view(len(seqs), -1)[:, :kv_len]
        positions = torch.arange(kv_len)[None, :]
        rows[positions >= lengths[:, None]] = self.pad_block * self.block_size
        write = rows[(positions >= (lengths - new)[:, None]) & (positions < lengths[:, None])]
        q = int(new.max())
        real = None if q == 1 else torch.arange(q)[None, :] >= (q - new)[:, None]
        self._plan = (write.to(device), rows.reshape(-1).to(device), (len(seqs), kv_len),
                      None if real is None else real.to(device))

    def _pools(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            _, heads, _, dim = like.shape
            shape = ((self.pad_block + 1) * self.block_size, heads, dim)
            self.k[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.k[layer], self.v[layer]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key_states: [batch, heads, q, dim] for the new tokens; returns every token's K/V, padded."""
        k, v = self._pools(layer_idx, key_states)
        write, read, (batch, kv_len), real = self._plan
        k[write] = self._real(key_states, real)
        v[write] = self._real(value_states, real)
        heads, dim = k.shape[1], k.shape[2]
        out_k, out_v = self._scratch(read.numel(), k)
        # [batch * kv_len, H, D] -> [batch, H, kv_len, D]: a strided view, which attention accepts
        gathered_k = torch.index_select(k, 0, read, out=out_k).view(batch, kv_len, heads, dim).transpose(1, 2)
        gathered_v = torch.index_select(v, 0, read, out=out_v).view(batch, kv_len, heads, dim).transpose(1, 2)
        return gathered_k, gathered_v

    def _scratch(self, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a layer's gathered K/V go, reused by every layer (each layer's attention is done
        before the next layer's update): a fresh multi-MB tensor per layer per step cost more than
        the gather itself here (page faults on new memory)."""
        if self._gather is None or self._gather[0].shape[0] < rows or self._gather[0].shape[1:] != like.shape[1:]:
            shape = (rows * 3 // 2, *like.shape[1:])
            self._gather = (torch.empty(shape, dtype=like.dtype, device=like.device),
                            torch.empty(shape, dtype=like.dtype, device=like.device))
        return self._gather[0][:rows], self._gather[1][:rows]

    @staticmethod
    def _real(states: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """[batch, H, q, D] -> [tokens, H, D]: the real (non-padding) tokens, row by row."""
        tokens = states.transpose(1, 2)
        return tokens[:, 0] if real is None else tokens[real]


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.cache = PagedKVCache(num_blocks, block_size)
        # transformers 5 renamed `past_key_values` to `cache`; models not yet migrated take the old name
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 logits_to_keep: int = 1) -> torch.Tensor:
        """[batch, logits_to_keep (0: every position), vocab] float32 logits."""
        out = self.model(
            input_ids=input_ids.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=mask.to(self.device),
            **{self.cache_kwarg: self.cache},
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        return out.logits.float()

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Compute each sequence's uncached tokens; returns last-token logits."""
        return self._prefill([(seq, seq.num_cached, seq.num_tokens) for seq in seqs])[:, -1]

    def prefill_span(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Compute `seq`'s tokens [start, end) over its cached [0, start); returns every one's logits."""
        return self._prefill([(seq, start, end)], logits_to_keep=0)[0]

    def _prefill(self, spans: list[tuple[Sequence, int, int]], logits_to_keep: int = 1) -> torch.Tensor:
        q = max(end - start for _, start, end in spans)
        kv_len = max(end for _, _, end in spans)
        input_ids = torch.zeros((len(spans), q), dtype=torch.long)
        positions = torch.zeros((len(spans), q), dtype=torch.long)
        mask = torch.zeros((len(spans), 1, q, kv_len), dtype=torch.bool)
        mask[:, :, :, 0] = True  # padding rows attend somewhere, so they stay finite
        keys = torch.arange(kv_len)
        for i, (seq, start, end) in enumerate(spans):
            n = end - start
            input_ids[i, q - n :] = torch.tensor(seq.token_ids[start:end])
            pos = torch.arange(start, end)
            positions[i, q - n :] = pos
            mask[i, 0, q - n :] = keys[None, :] <= pos[:, None]
        seqs = [seq for seq, _, _ in spans]
        self.cache.plan(seqs, [end - start for _, start, end in spans], self.device, [end for _, _, end in spans])
        return self._forward(input_ids, positions, mask, logits_to_keep)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each running sequence."""
        positions = torch.tensor([seq.num_tokens - 1 for seq in seqs])
        kv_len = int(positions.max()) + 1
        mask = (torch.arange(kv_len)[None, :] <= positions[:, None])[:, None, None, :]
        input_ids = torch.tensor([[seq.last_token_id] for seq in seqs])
        self.cache.plan(seqs, [1] * len(seqs), self.device)
        return self._forward(input_ids, positions[:, None], mask)[:, -1]
