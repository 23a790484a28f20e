"""Runs the Hugging Face model over a batch of sequences with Conduit's own paged KV cache.

The model is any `AutoModelForCausalLM`; we supply (a) a cache object whose `update()` the
attention layers call, (b) the attention function they call through transformers' attention
interface, and (c) its mask. So every architecture that uses the standard cache and attention
protocols runs here unmodified (app/engine/attention.py has the cache and the attention).

Each forward packs the new tokens of every scheduled sequence into one row, without padding: a
decode step is `batch` tokens, a prefill the uncached part of each prompt, and any mix of the two
works the same (`forward`). Attention reads each sequence's K/V where its blocks lie in the pool.

Measured side by side (bench/attention.py, one run, demo model, 2-core CPU, prompts ~113-128
tokens, medians; "gather" is the path this replaced: a left-padded batch whose K/V were copied out
of the pool by block table every layer, then SDPA):

    $ .venv/bin/python bench/attention.py --rounds 3 --steps 24 --threads 1   (2026-11-30)
    batch |  decode step ms     |  output tok/s       |  prefill of the batch ms
          |  gather   in place  |  gather   in place  |  gather   in place
        1 |    7.60      10.42  |     132         96  |    37.8       29.1
        8 |   12.66      15.29  |     632        523  |   227.5      161.9
       32 |   30.96      28.20  |    1033       1135  |   859.1      676.4

One torch thread, as a served replica runs (`num_cpus: 1`), on a machine shared with other jobs
(load average 3.5-7), so absolute figures swing from run to run. Two earlier runs (of this code
before its block-mask arithmetic moved from torch to numpy) agree at batch 1 decode (in place 2-3
ms a step behind in all three) and at batch 32, decode and prefill (in place ahead in all three);
batch 8 decode was behind in two of the three (10.3 vs 15.6 ms ahead in the other). Where it
loses, it is fixed costs per step, not attention: the block mask built on the host, and dynamo's
guard check before each layer's compiled kernel (0.4-0.6 ms a call in a micro-benchmark here,
against 0.04-0.14 ms for a batch-1 gather + SDPA), which the gather it removes does not repay at
small batches and ~128-token contexts.

The kernel compiles at start-up (twice per query tile, ~10-40 s on this machine, then cached on
disk by Inductor, a few seconds on later starts), for mask buffers already sized for the engine's
largest prefill step (`forward_size`): a size first met at runtime would compile while every stream
waits (docs/benchmark.md: the first load after a start ran at 350 tok/s against 1,204). Memory: the pool is exactly the blocks; a shared
prefix is one set of blocks, never copied.
"""

from __future__ import annotations

import inspect

import torch

from app.config import EngineConfig
from app.engine.attention import ForwardSize, PagedKVCache, query_tile, use_paged_attention
from app.engine.lora.slots import LoraSlots
from app.engine.scheduler import borrowed_slots
from app.engine.sequence import Sequence

# (block table, token ids, start, end): one sequence computing its positions [start, end)
Span = tuple[list[int], list[int], int, int]


def forward_size(config: EngineConfig) -> ForwardSize:
    """The largest forward an engine with `config` runs: a prefill step's token budget from every batch
    slot, borrowed ones included. (A lone prompt over the budget, which the scheduler still admits,
    grows the buffers once, as does a prefill span scored alone.)"""
    return ForwardSize(config.max_prefill_tokens, config.max_num_seqs + borrowed_slots(config.max_num_seqs),
                       config.max_model_len)


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, size: ForwardSize = ForwardSize()):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        use_paged_attention(self.model)
        self.cache = PagedKVCache(num_blocks, block_size, self.device, size)
        # transformers 5 renamed `past_key_values` to `cache`; models not yet migrated take the old name
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.lora: LoraSlots | None = None  # the engine's adapter slots, when it serves LoRA (app/engine/lora/)
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
        return self._run([(seq.block_ids, seq.token_ids[start:end], start, end)], logits_to_keep=0, seqs=[seq])

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each running sequence: [batch, vocab]."""
        return self._run([(seq.block_ids, [seq.last_token_id], seq.num_tokens - 1, seq.num_tokens) for seq in seqs],
                         logits_to_keep=0, seqs=seqs)

    def verify(self, spans: list[tuple[Sequence, list[int]]]) -> torch.Tensor:
        """Speculative decoding's scoring forward: each (sequence, draft) computes [last token, *draft]
        at its positions, K/V written for each; every position's logits [sum(len(draft) + 1), vocab], in
        order. An empty draft is a plain decode row."""
        return self._run([(seq.block_ids, [seq.last_token_id] + draft, seq.num_tokens - 1, seq.num_tokens + len(draft))
                          for seq, draft in spans], logits_to_keep=0, seqs=[seq for seq, _ in spans])

    def forward(self, spans: list[tuple[Sequence, int, int]]) -> torch.Tensor:
        """Any mix of prefills, prefix-cached prefills and decodes in one forward: (sequence, start,
        end) computes its tokens [start, end) over its cached [0, start). Last-token logits [batch, vocab]."""
        packed = [(seq.block_ids, seq.token_ids[start:end], start, end) for seq, start, end in spans]
        last = torch.tensor([end - start for _, start, end in spans]).cumsum(0) - 1
        return self._run(packed, logits_to_keep=last, seqs=[seq for seq, _, _ in spans])

    def _run(self, spans: list[Span], logits_to_keep: int | torch.Tensor,
             seqs: list[Sequence] | None = None) -> torch.Tensor:
        """One forward over the spans' tokens packed in one row. `logits_to_keep`: the packed
        positions whose logits to return (0: all). `seqs`: the spans' sequences, whose LoRA slots
        apply to their tokens. Float32 logits [positions, vocab]."""
        if self.lora is None or seqs is None:
            return self._forward(spans, logits_to_keep)
        self.lora.plan([len(tokens) for _, tokens, _, _ in spans], [seq.lora_slot for seq in seqs])
        try:
            return self._forward(spans, logits_to_keep)
        finally:
            self.lora.done()

    def _forward(self, spans: list[Span], logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        input_ids = torch.tensor([token for _, tokens, _, _ in spans for token in tokens])
        positions = torch.cat([torch.arange(start, end) for _, _, start, end in spans])
        tile = query_tile(self.device, max(end - start for _, _, start, end in spans))
        mask, rows, decodes = self.cache.plan([(blocks, start, end) for blocks, _, start, end in spans], tile)
        out = self.model(
            input_ids=input_ids[None].to(self.device),
            position_ids=positions[None].to(self.device),
            attention_mask=mask,
            paged_rows=rows,
            paged_decodes=decodes,
            **{self.cache_kwarg: self.cache},
            use_cache=True,
            logits_to_keep=logits_to_keep if isinstance(logits_to_keep, int) else logits_to_keep.to(self.device),
        )
        return out.logits[0].float()
