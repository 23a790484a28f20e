"""Conduit's paged KV cache and the attention that reads it where it lies, with no gather.

Layout: per layer, one pool of `num_blocks * block_size` token rows `[row, kv_head, head_dim]`; a
sequence's position p lives in row `block_ids[p // block_size] * block_size + p % block_size`.

A forward is packed ("varlen"): the new tokens of every sequence in the batch, one after another in
a single row of `T` tokens (no padding), whether each sequence computes one token (decode), its
whole prompt (prefill), the part after a cached prefix, or a mix of these. Attention is PyTorch's
FlexAttention, compiled, over the whole pool seen as one `[1, kv_heads, rows, head_dim]` key/value
sequence (a strided view, no copy), with a `BlockMask` whose KV blocks are the cache's blocks.
Queries go in tiles of one sequence's tokens (CPU: 1 token when decoding, 16 when prompts are
computed; CUDA: 16, Triton's smallest; a sequence's last tile is padded, its pad rows attend
nothing). On CPU a forward that computes prompts and decodes together (the scheduler's mixed step)
attends in two calls, the prompts on 16-row tiles and the decodes after them on 1-row tiles, each
under its own mask: padded to 16 rows, a decode made a mixed step ~45% slower (docs/profile.md).
Each tile lists the blocks of its sequence's block table, so the kernel visits those blocks only,
in place: blocks wholly before the tile's first position are "full" (no mask evaluated), the rest
up to its last position "partial", masked by position. A block's position is the same in every
sequence holding it (block_manager.py shares block i only as block i), so one block -> position
table per step serves the mask.

Why compiled: eager FlexAttention is a reference implementation that materialises scores over the
whole pool. Compiled on CPU it is Inductor's C++ FlexAttention template; on CUDA, Triton's. The
token count is dynamic after its second distinct value, and every buffer the mask reads has a
fixed size (grown by doubling when outgrown), so a runner compiles twice per tile size and then
no more; it does that at start-up. Two limits of torch 2.13's CPU template shaped this file: it
does not compile a dynamic-size tensor captured by `mask_mod` (hence fixed-size buffers), and its
decoding variant for one query per batch entry scans the whole pool per query (hence one batch
entry holding every query). On CUDA (checked on one H200, torch 2.11, with bench/gpu_check.py:
greedy tokens equal `generate` in float32) the KV block size must be a multiple of 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CPU_PREFILL_TILE = 16
LOGICAL_SLOTS = 1 << 16
MAX_TILE = 64  # query rows per attention tile, at most
SHARED_ROWS, SHARED_WIDTH = 4096, 64  # the mask buffers' least sizes: query rows, blocks per sequence
# CUDA: Triton's tl.dot needs 16-row tiles (and so KV blocks a multiple of 16 tokens); the main
# kernel, not the decoding one, which assumes one query tile per batch entry
KERNEL_OPTIONS = {"cuda": {"BLOCK_M": 16, "BLOCK_N": 16, "FORCE_USE_FLEX_ATTENTION": True}}
ATTENTION = "conduit_paged"  # the name the model's attention layers look this implementation up by
_flex_attention = torch.compile(flex_attention, fullgraph=True)
# Each (block size, tile, pool size) compiles up to twice (static, then dynamic in the token count).
# Past the limit dynamo would run flex_attention eagerly, which this mask is not made for: fail instead.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
torch._dynamo.config.fail_on_recompile_limit_hit = True


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            paged_rows: torch.Tensor | None = None, paged_decodes: DecodeRows | None = None,
                            **kwargs):
    """transformers' attention-interface signature. From a PagedKVCache forward (its mask is a
    BlockMask): query [1, heads, T, D], key/value the layer's whole pool as [1, kv_heads, rows, D],
    `paged_rows` the tiled row of each query when tiles pad, `paged_decodes` the decode rows that
    follow on tiles of their own (PagedKVCache.plan). From anyone else using the same model object
    (`generate`, in tests): plain SDPA."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if paged_decodes is None:
        out = _attend(query, key, value, attention_mask, paged_rows, scaling)
    else:
        split = query.shape[2] - paged_decodes.count
        out = torch.cat((_attend(query[:, :, :split], key, value, attention_mask, paged_rows, scaling),
                         _attend(query[:, :, split:], key, value, paged_decodes.mask, None, scaling)), 2)
    return out.transpose(1, 2).contiguous(), None


def _attend(query, key, value, mask: BlockMask, tiled_rows: torch.Tensor | None, scaling) -> torch.Tensor:
    """[1, heads, T, D]: the queries attended under `mask`, on tiles of its rows (`tiled_rows`: each
    query's row there, when tiles pad)."""
    if tiled_rows is not None:
        tiled = query.new_zeros(*query.shape[:2], mask.seq_lengths[0], query.shape[3])
        tiled[:, :, tiled_rows] = query
        query = tiled
    else:  # one memory layout for every call, so one compilation serves them all
        query = query.contiguous()
    out = _flex_attention(query, key, value, block_mask=mask, scale=scaling,
                          enable_gqa=query.shape[1] != key.shape[1], kernel_options=KERNEL_OPTIONS.get(query.device.type))
    return out if tiled_rows is None else out[:, :, tiled_rows]


def query_tile(device: torch.device, most_new_tokens: int) -> int:
    """Query rows per attention tile for a forward whose sequences compute up to `most_new_tokens`
    each. On CPU one row (a decode wastes nothing) unless prompts are being computed."""
    if device.type == "cuda":
        return 16
    return 1 if most_new_tokens == 1 else CPU_PREFILL_TILE


def use_paged_attention(model) -> None:
    """Switch `model`'s attention layers to `paged_attention_forward` (masks built as for SDPA, which
    is what the model does for callers other than the runner)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)


@dataclass(frozen=True)
class ForwardSize:
    """The largest forward the mask's buffers are sized for up front: `tokens` new tokens from up to
    `sequences` sequences, none longer than `max_len`. The buffers have static sizes, so a size first
    met at runtime is a compilation while every stream waits (seconds): a prefill step of 29 prompts of
    140 tokens, 4,176 rows once each is padded to whole tiles, used to outgrow the 4,096 rows sized
    for every engine and stall the first load after each start."""
    tokens: int = 4096
    sequences: int = 64
    max_len: int = 1024


@dataclass(frozen=True)
class DecodeRows:
    """The last `count` queries of a forward that computes prompts too: decodes, one query each,
    attended on 1-row tiles under `mask` rather than padded to the prompts' tiles (on CPU a decode
    row padded to 16 made a 32-sequence step's attention ~1.5-2x slower, docs/profile.md)."""

    count: int
    mask: BlockMask


class MaskBuffers:
    """The fixed-size buffers one kind of tile's BlockMask reads (each size is a compilation), and its
    `mask_mod`. A cache holds two: prompts' tiles and 1-row tiles, so both kinds of query in one
    forward each have their own."""

    def __init__(self, num_blocks: int, block_size: int, logical: torch.Tensor, rows: int, width: int):
        self.num_blocks, self.block_size, self.logical = num_blocks, block_size, logical
        self._grow(rows, width)

    @property
    def capacity(self) -> tuple[int, int]:
        """(query rows, blocks per sequence) the buffers hold now; more means a compilation."""
        return self._rows, self._width

    def mask(self, tile_tables: np.ndarray, full: np.ndarray, partial: np.ndarray, qpos: np.ndarray,
             tile: int) -> BlockMask:
        tiles, width = tile_tables.shape
        reach = _reach(tile, self.block_size)  # most blocks one tile's rows end in
        if len(qpos) > self._rows or width > self._width:
            self._grow(max(len(qpos), self._rows), max(width, self._width))
        n, rows, device = self.num_blocks, self._rows, self.logical.device
        own = tile_tables[np.arange(tiles)[:, None], np.minimum(full[:, None] + np.arange(reach), width - 1)]
        self._qpos[: len(qpos)].copy_(torch.from_numpy(qpos))
        self._tables[: rows * self._width].view(rows, self._width)[:tiles, :width].copy_(torch.from_numpy(tile_tables))
        self._partial[: rows * self._width].view(rows, self._width)[:tiles, :reach].copy_(torch.from_numpy(own))
        partial_count, full_count = (torch.from_numpy(c.astype(np.int32)).view(1, 1, tiles).to(device)
                                     for c in (partial, full))
        # [1, 1, tiles, num_blocks] views of small buffers: the kernel reads only each tile's first
        # `count` entries, but wants the last dim to span the pool (rows then overlap, harmlessly).
        # Both with one row stride: torch 2.11's Triton kernel reads the full blocks' table with the
        # partial one's strides (on an H200, every query past the first KV block came out wrong)
        full_idx = self._tables.as_strided((1, 1, tiles, n), (0, 0, self._width, 1))
        partial_idx = self._partial.as_strided((1, 1, tiles, n), (0, 0, self._width, 1))
        return BlockMask.from_kv_blocks(partial_count, partial_idx, full_count, full_idx,
                                        BLOCK_SIZE=(tile, self.block_size), mask_mod=self._mask_mod,
                                        seq_lengths=(len(qpos), n * self.block_size), compute_q_blocks=False)

    def _grow(self, rows: int, width: int) -> None:
        """(Re)allocate the buffers for `rows` query rows of `width` blocks, doubling: a new size means
        a new compilation, so it must be rare."""
        self._rows = 1 << (rows - 1).bit_length()
        self._width = max(1 << (width - 1).bit_length(), 1 << (_reach(MAX_TILE, self.block_size) - 1).bit_length())
        # the views `mask` takes span the pool past the last row: room for the largest pool this serves,
        # so that no buffer's size depends on the pool's (engines of different sizes share compilations)
        device, span = self.logical.device, len(self.logical)
        self._qpos = torch.full((self._rows,), -1, dtype=torch.long, device=device)
        self._tables = torch.zeros(self._rows * self._width + span, dtype=torch.int32, device=device)
        self._partial = torch.zeros(self._rows * self._width + span, dtype=torch.int32, device=device)
        # Static sizes: a grown buffer then compiles as a new static shape. Left to dynamo's automatic
        # dynamic shapes, it would add size symbols (ks10, ks11, ...) that torch 2.13's CPU
        # FlexAttention template corrupts (its textual replace of "ks1" also rewrites "ks10": a C++
        # compile error, first seen as a 32-prompt prefill burst outgrowing the 4096 rows).
        for buffer in (self._qpos, self._tables, self._partial):
            torch._dynamo.mark_static(buffer)
        qpos, logical, bs = self._qpos, self.logical, self.block_size

        def mask_mod(b, h, q, kv):  # evaluated on partial blocks only
            return logical[kv // bs] * bs + kv % bs <= qpos[q]

        self._mask_mod = mask_mod


def _reach(tile: int, block_size: int) -> int:
    return (tile - 2) // block_size + 2 if tile > 1 else 1


class PagedKVCache:
    """The object transformers' attention layers call `update()` on. Pools are allocated on first
    use, from the shapes the model really produces (so head counts and dims need no config lookup;
    under tensor parallelism a rank's pool holds its own heads)."""

    def __init__(self, num_blocks: int, block_size: int, device: torch.device, size: ForwardSize = ForwardSize()):
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, device
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.write: torch.Tensor | None = None  # this forward's new tokens' pool rows
        # each block's index in the block tables that hold it (the same in all of them: block_manager
        # shares block i only as block i); the mask reads it on partial blocks
        self._logical = np.zeros(num_blocks, np.int64)
        # a fixed size for any pool up to LOGICAL_SLOTS blocks: engines of different sizes in one process
        # (tests) then share compilations
        slots = max(LOGICAL_SLOTS, 1 << (num_blocks - 1).bit_length())
        self._logical_device = torch.zeros(slots, dtype=torch.long, device=device)
        torch._dynamo.mark_static(self._logical_device)  # as MaskBuffers marks its own (see there)
        pad = query_tile(device, size.tokens) - 1  # each sequence's last tile
        # never below the sizes small engines share: engines of different sizes in one process (tests)
        # then share compilations, as the logical slots above do
        width = max(SHARED_WIDTH, -(-size.max_len // block_size))
        self._tiled = MaskBuffers(num_blocks, block_size, self._logical_device,
                                  max(SHARED_ROWS, size.tokens + pad * size.sequences), width)
        self._single = MaskBuffers(num_blocks, block_size, self._logical_device, max(SHARED_ROWS, size.sequences),
                                   width)

    @property
    def capacity(self) -> tuple[int, int]:
        """(query rows, blocks per sequence) the prompts' mask buffers hold now; more means a compilation."""
        return self._tiled.capacity

    # per forward ----------------------------------------------------------------------------
    def plan(self, spans: list[tuple[list[int], int, int]], tile: int = 1
             ) -> tuple[BlockMask, torch.Tensor | None, DecodeRows | None]:
        """Before a forward of the packed tokens of `spans`: (block table, start, end), a sequence
        computing its positions [start, end) over its cached [0, start). Attention runs on query
        tiles of `tile` rows, each of one sequence (its last tile padded), except that the decodes
        at the end of a forward computing prompts get 1-row tiles where the device allows them.
        Returns the attention mask, the padded row of each packed token when tiles pad (else None),
        and those decodes (else None).
        Index arithmetic in numpy: a step's few dozen small operations cost several times more as
        torch calls, which matters most to small batches."""
        bs, count = self.block_size, len(spans)
        starts = np.fromiter((start for _, start, _ in spans), np.int64, count)
        ends = np.fromiter((end for _, _, end in spans), np.int64, count)
        new = ends - starts
        width = int(-(-ends.max() // bs))
        tables = np.zeros((count, width), np.int64)
        held = np.zeros((count, width), bool)  # table entries that are real blocks, not padding
        for i, (ids, _, _) in enumerate(spans):
            row = ids[:width]
            tables[i, : len(row)] = row
            held[i, : len(row)] = True
        seq = np.repeat(np.arange(count), new)  # the sequence of each packed token
        before = np.cumsum(new) - new  # packed tokens of the sequences before each
        pos = np.arange(len(seq)) - np.repeat(before, new) + starts[seq]
        self.write = torch.from_numpy(tables[seq, pos // bs] * bs + pos % bs).to(self.device)
        self._logical[tables[held]] = np.broadcast_to(np.arange(width), tables.shape)[held]
        self._logical_device[: self.num_blocks].copy_(torch.from_numpy(self._logical))
        split = count  # spans from here on are decodes on 1-row tiles
        if tile > 1 and query_tile(self.device, 1) == 1:
            while split > 1 and new[split - 1] == 1:
                split -= 1
        head = int(before[split]) if split < count else len(seq)  # the packed tokens before the decodes
        mask, padded = self._part_mask(tables[:split], new[:split], pos[:head], tile)
        if split == count:
            return mask, padded, None
        decodes, _ = self._part_mask(tables[split:], new[split:], pos[head:], 1)
        return mask, padded, DecodeRows(count - split, decodes)

    def _part_mask(self, tables: np.ndarray, new: np.ndarray, pos: np.ndarray, tile: int
                   ) -> tuple[BlockMask, torch.Tensor | None]:
        """The mask of consecutive spans (their block tables, new token counts, the new tokens'
        positions) on `tile`-row tiles, and the padded row of each token when tiles pad."""
        bs, count = self.block_size, len(new)
        seq = np.repeat(np.arange(count), new)
        if tile == 1:
            qpos, tile_seq, padded = pos, seq, None
        else:
            before = np.cumsum(new) - new
            tiles = -(-new // tile)
            padded = np.repeat((np.cumsum(tiles) - tiles) * tile - before, new) + np.arange(len(seq))
            qpos = np.full(int(tiles.sum()) * tile, -1, np.int64)  # -1: a padding row, attends nothing
            qpos[padded] = pos
            tile_seq = np.repeat(np.arange(count), tiles)
            padded = torch.from_numpy(padded).to(self.device)
        tile_pos = qpos.reshape(-1, tile)
        full = (tile_pos[:, 0] + 1) // bs  # blocks wholly at or before every row of the tile: not masked
        partial = tile_pos.max(1) // bs + 1 - full
        buffers = self._single if tile == 1 else self._tiled
        return buffers.mask(tables[tile_seq], full, partial, qpos, tile), padded

    # per layer ------------------------------------------------------------------------------
    def _pools(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            _, heads, _, dim = like.shape
            shape = (self.num_blocks * self.block_size, heads, dim)
            self.k[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.k[layer], self.v[layer]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key_states: [1, kv_heads, T, D] for the packed new tokens. Writes them into their rows and
        returns the layer's pools as [1, kv_heads, rows, D] views, for paged_attention_forward."""
        k, v = self._pools(layer_idx, key_states)
        k.index_copy_(0, self.write, key_states[0].transpose(0, 1))
        v.index_copy_(0, self.write, value_states[0].transpose(0, 1))
        return k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None]
