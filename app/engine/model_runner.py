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

from app.engine.attention import PagedKVCache, query_tile, use_paged_attention
from app.engine.sequence import Sequence

# (block table, token ids, start, end): one sequence computing its positions [start, end)
Span = tuple[list[int], list[int], int, int]


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        use_paged_attention(self.model)
        self.cache = PagedKVCache(num_blocks, block_size, self.device)
        # transformers 5 renamed `past_key_values` to `cache`; models not yet migrated take the old name
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._compile()

    @torch.inference_mode()
    def _compile(self) -> None:
        """Compile the attention kernel now rather than in the first requests: once for one token,
        once for several (its token count is dynamic from then on). The rows it writes are block 0's,
        which no sequence has yet."""
        for tokens in (1, 2):  # one decode (one token per sequence), then prefills
            for batch in (1, 2):
                self._run([([0], list(range(tokens)), 0, tokens)] * batch, logits_to_keep=1)

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Compute each sequence's uncached tokens; returns last-token logits [batch, vocab]."""
        return self.forward([(seq, seq.num_cached, seq.num_tokens) for seq in seqs])

    def prefill_span(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Compute `seq`'s tokens [start, end) over its cached [0, start); returns every one's logits."""
        return self._run([(seq.block_ids, seq.token_ids[start:end], start, end)], logits_to_keep=0)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each running sequence: [batch, vocab]."""
        return self._run([(seq.block_ids, [seq.last_token_id], seq.num_tokens - 1, seq.num_tokens) for seq in seqs],
                         logits_to_keep=0)

    def forward(self, spans: list[tuple[Sequence, int, int]]) -> torch.Tensor:
        """Any mix of prefills, prefix-cached prefills and decodes in one forward: (sequence, start,
        end) computes its tokens [start, end) over its cached [0, start). Last-token logits [batch, vocab]."""
        packed = [(seq.block_ids, seq.token_ids[start:end], start, end) for seq, start, end in spans]
        last = torch.tensor([end - start for _, start, end in spans]).cumsum(0) - 1
        return self._run(packed, logits_to_keep=last)

    def _run(self, spans: list[Span], logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """One forward over the spans' tokens packed in one row. `logits_to_keep`: the packed
        positions whose logits to return (0: all). Float32 logits [positions, vocab]."""
        input_ids = torch.tensor([token for _, tokens, _, _ in spans for token in tokens])
        positions = torch.cat([torch.arange(start, end) for _, _, start, end in spans])
        tile = query_tile(self.device, max(end - start for _, _, start, end in spans))
        mask, rows = self.cache.plan([(blocks, start, end) for blocks, _, start, end in spans], tile)
        out = self.model(
            input_ids=input_ids[None].to(self.device),
            position_ids=positions[None].to(self.device),
            attention_mask=mask,
            paged_rows=rows,
            **{self.cache_kwarg: self.cache},
            use_cache=True,
            logits_to_keep=logits_to_keep if isinstance(logits_to_keep, int) else logits_to_keep.to(self.device),
        )
        return out.logits[0].float()
