"""Attention that reads the paged KV cache in place (app/engine/attention.py): a packed forward of any
mix of prefills, prefix-cached prefills and decodes, over scattered blocks, must give the logits
the model gives over each sequence alone, and the engine built on it must stay equal to `generate`."""

import random

import pytest
import torch

from app.engine.attention import ForwardSize
from app.engine.model_runner import ModelRunner
from app.engine.sampling_params import SamplingParams
from app.engine.sequence import Sequence
from tests.unit.test_engine import greedy, make_engine, prompts, run_all

BLOCK = 4


@pytest.fixture(scope="module")
def runner(hf_model):
    return ModelRunner(hf_model[0], num_blocks=64, block_size=BLOCK)


def sequence(tokens: list[int], blocks: list[int]) -> Sequence:
    seq = Sequence("s", tokens, SamplingParams(), None, frozenset())
    seq.block_ids = blocks
    return seq


def full_logits(model, tokens: list[int]) -> torch.Tensor:
    """What the model alone (SDPA, no cache) gives at every position of `tokens`."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()


def scattered(rng: random.Random, count: int, free: list[int]) -> list[int]:
    """`count` blocks taken in random order from `free` (so a sequence's blocks are never adjacent in order)."""
    picked = rng.sample(free, count)
    for block in picked:
        free.remove(block)
    return picked


@torch.inference_mode()
def test_mixed_batch_over_scattered_blocks(hf_model, runner):
    """One forward: a whole prompt, a prompt after 2 cached blocks, and decodes whose positions sit
    at a block's start, middle and end; lengths 1 to 23 tokens."""
    model, tokenizer = hf_model
    rng = random.Random(0)
    free = list(range(64))
    text = tokenizer.encode("def f(x): return x * 2  # the quick brown fox jumps over the lazy dog " * 4)
    # (tokens, start): start = tokens already cached (computed first, on their own)
    cases = [(text[:13], 0), (text[5:28], 2 * BLOCK), (text[9:20], 10), (text[2:7], BLOCK), (text[30:31], 0),
             (text[40:48], 2 * BLOCK - 1), (text[11:23], 2 * BLOCK + 2)]
    seqs = [sequence(tokens, scattered(rng, -(-len(tokens) // BLOCK), free)) for tokens, _ in cases]
    cached = [(seq, 0, start) for seq, (_, start) in zip(seqs, cases) if start]
    runner.forward(cached)  # fills the cached prefixes, as their own earlier prefill would have
    logits = runner.forward([(seq, start, seq.num_tokens) for seq, (_, start) in zip(seqs, cases)])
    for i, (tokens, _) in enumerate(cases):
        torch.testing.assert_close(logits[i], full_logits(model, tokens)[-1], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_prompts_then_decodes_in_one_forward_attend_the_decodes_on_their_own_tiles(hf_model, runner):
    """A mixed step as the scheduler orders it: prompts first (one after a cached prefix), then
    decodes, one token each over their cached context. On CPU the decodes go on 1-row tiles of their
    own (PagedKVCache.plan); every sequence's logits still equal the model's."""
    model, tokenizer = hf_model
    rng = random.Random(1)
    free = list(range(64))
    text = tokenizer.encode("def f(x): return x * 2  # the quick brown fox jumps over the lazy dog " * 4)
    prompts = [(text[:13], 0), (text[5:28], 2 * BLOCK)]
    decodes = [(text[9:20], 10), (text[2:6], 3), (text[40:49], 8)]  # positions at a block's end, start, middle
    cases = prompts + decodes
    seqs = [sequence(tokens, scattered(rng, -(-len(tokens) // BLOCK), free)) for tokens, _ in cases]
    runner.forward([(seq, 0, start) for seq, (_, start) in zip(seqs, cases) if start])
    spans = [(seq, start, seq.num_tokens) for seq, (_, start) in zip(seqs, cases)]
    _, _, decode_rows = runner.cache.plan([(seq.block_ids, start, end) for seq, start, end in spans], tile=16)
    assert decode_rows is not None and decode_rows.count == len(decodes)
    logits = runner.forward(spans)
    for i, (tokens, _) in enumerate(cases):
        torch.testing.assert_close(logits[i], full_logits(model, tokens)[-1], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_shared_prefix_blocks_and_every_position(hf_model, runner):
    """Two sequences hold the same first blocks (a prefix-cache hit); the second computes only its
    tail, and scoring every position of it (prefill_span) matches the model at every position."""
    model, tokenizer = hf_model
    prefix = tokenizer.encode("You are a helpful assistant. " * 3)[: 3 * BLOCK]
    first = prefix + tokenizer.encode(" Hi there")
    second = prefix + tokenizer.encode(" Sort a dict by value, please")
    shared = [40, 7, 23]
    a = sequence(first, shared + [5, 61, 2])
    b = sequence(second, shared + [9, 33, 18, 50, 11])
    runner.forward([(a, 0, a.num_tokens)])
    span = runner.prefill_span(b, len(prefix), b.num_tokens)
    torch.testing.assert_close(span, full_logits(model, second)[len(prefix):], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_decode_matches_the_model_across_block_boundaries(hf_model, runner):
    model, tokenizer = hf_model
    tokens = tokenizer.encode("for i in range(10): print(i)")[:5]
    seq = sequence(tokens, [60, 3, 47, 12, 30, 8])
    runner.prefill([seq])
    seq.num_cached = seq.num_tokens
    for _ in range(3 * BLOCK):  # crosses three block boundaries
        logits = runner.decode([seq])
        torch.testing.assert_close(logits[0], full_logits(model, seq.token_ids)[-1], atol=1e-4, rtol=1e-4)
        seq.output_ids.append(int(logits[0].argmax()))


def test_small_blocks_with_preemption_equal_generate(hf_model, reference_greedy):
    """Blocks of 4 tokens, too few of them: sequences are preempted and recomputed (from the prefix
    cache where they can), and every block boundary is crossed many times."""
    engine = make_engine(hf_model, num_kv_blocks=40, block_size=4)
    ps = [p[:25] for p in prompts(hf_model[1], 6, seed=3)]
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, greedy(30))
    outputs = run_all(engine)
    assert engine.stats().num_preemptions > 0
    for i, p in enumerate(ps):
        assert outputs[str(i)] == reference_greedy(p, 30), f"request {i} diverged"


def test_many_lengths_in_one_batch_equal_generate(hf_model, reference_greedy):
    """Batch of 12 whose prompts are 1 to 45 tokens long, joined mid-run by more."""
    engine = make_engine(hf_model, block_size=8)
    tokenizer = hf_model[1]
    base = tokenizer.encode("def compute(values): return sorted(v * 2 for v in values if v) " * 4)
    ps = [base[: 1 + 4 * i] for i in range(12)]
    outputs: dict[str, list[int]] = {}
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, greedy(12))
        if i % 4 == 3:  # the rest arrive while these decode
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.token_ids)
    for rid, toks in run_all(engine).items():
        outputs.setdefault(rid, []).extend(toks)
    for i, p in enumerate(ps):
        assert outputs[str(i)] == reference_greedy(p, 12), f"request {i} ({len(p)} tokens) diverged"


def burst_prompts(tokenizer, count: int = 32, length: int = 150) -> list[list[int]]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(length)) for i in range(count)]
    return [tokenizer.encode(text)[:length] for text in texts]


@torch.inference_mode()
def test_a_prefill_burst_that_outgrows_the_mask_buffers(hf_model):
    """32 prompts of ~150 tokens in one forward through a runner sized for less: more query rows than
    the mask's buffers hold, so they grow and the kernel compiles for the new size. Under automatic
    dynamic shapes that compile failed in Inductor's C++ codegen (the replica's engine died); each
    prompt's logits must equal the model's alone."""
    model, tokenizer = hf_model
    prompts = burst_prompts(tokenizer)
    block = 16
    runner = ModelRunner(model, num_blocks=32 * 10, block_size=block, size=ForwardSize(tokens=1024, sequences=8))
    rows = runner.cache.capacity[0]
    seqs = [sequence(tokens, list(range(i * 10, i * 10 + -(-len(tokens) // block)))) for i, tokens in enumerate(prompts)]
    assert sum(-(-len(tokens) // 16) * 16 for tokens in prompts) > rows  # the padded query rows outgrow them
    logits = runner.forward([(seq, 0, seq.num_tokens) for seq in seqs])
    assert runner.cache.capacity[0] > rows
    for i in (0, 13, 31):
        torch.testing.assert_close(logits[i], full_logits(model, prompts[i])[-1], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_a_burst_within_the_prefill_budget_finds_its_buffers_ready(hf_model, reference_greedy):
    """An engine sizes the mask's buffers for its prefill budget from every batch slot when it starts:
    32 prompts of 150 tokens arriving together (27 fit the 4,096-token budget of one step: 4,320 query
    rows once padded to tiles) must fit them. Growing them compiles the kernel while every stream
    waits: before, this burst outgrew the 4,096 rows sized for everyone and stalled the first load
    after each start by seconds."""
    engine = make_engine(hf_model, max_num_seqs=32, max_model_len=1024)
    capacity = engine.runner.cache.capacity
    prompts = burst_prompts(hf_model[1])
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, greedy(4))
    outputs = run_all(engine)
    assert engine.runner.cache.capacity == capacity
    for i in (0, 31):
        assert outputs[str(i)] == reference_greedy(prompts[i], 4)
