"""Speculative decoding with the demo model: the draft-model proposer over its own paged KV cache, and a
one-sequence speculative loop over the engine's ModelRunner (propose, verify k+1 positions in one
forward, keep the accepted tokens, roll the cache back) whose greedy output must equal transformers'
`generate` token for token. The engine's batched loop is phase 2 (docs/speculative-decoding.md)."""

import random

import pytest
import torch

from app.config import SpeculativeConfig
from app.engine.block_manager import BlockManager
from app.engine.model_runner import ModelRunner
from app.engine.sampling_params import SamplingParams
from app.engine.sequence import Sequence
from app.engine.spec.draft import DraftModelProposer, DraftSequence, tokenizers_match
from app.engine.spec.ngram import NgramProposer
from app.engine.spec.verify import verify

BLOCKS, BLOCK_SIZE = 256, 16
CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages
'''


@pytest.fixture(scope="module")
def draft_proposer(hf_model):
    model, _ = hf_model
    return DraftModelProposer(model, BLOCKS, BLOCK_SIZE)  # the target as its own draft: it agrees always


@pytest.fixture(scope="module")
def target_runner(hf_model):
    return ModelRunner(hf_model[0], BLOCKS, BLOCK_SIZE)


def engine_seq(request_id: str, prompt: list[int], max_tokens: int) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return Sequence(request_id, prompt, params, None, frozenset())


def test_the_target_as_its_own_draft_drafts_its_greedy_continuation(hf_model, draft_proposer, reference_greedy):
    """Batched drafting across rounds where the target accepts all, some, or none of the draft (a token
    the draft did not propose): the draft's cache must roll back to exactly the tokens that stood."""
    _, tokenizer = hf_model
    rng = random.Random(0)
    seqs = [engine_seq(f"d{i}", tokenizer.encode(text), 200)
            for i, text in enumerate(["def f(x):\n    return", "import os\nimport sys\n", CODE])]
    k = 4
    for _ in range(6):
        drafts = draft_proposer.propose(seqs, [k] * len(seqs))
        for seq, draft in zip(seqs, drafts):
            assert draft == reference_greedy(seq.token_ids, k)
            kept = rng.randint(0, k)  # the target accepted `kept` drafts, then added a token of its own
            own = draft[kept] if kept < k and rng.random() < 0.5 else rng.randrange(100, 2000)
            seq.output_ids += draft[:kept] + [own]
    for seq in seqs:
        draft_proposer.free(seq.request_id)
    assert draft_proposer.blocks.num_used == 0


@torch.inference_mode()
def speculative_greedy(runner: ModelRunner, proposer, prompt: list[int], max_tokens: int, k: int):
    """One sequence decoded speculatively on the target's paged cache: (tokens, drafted, accepted)."""
    blocks = BlockManager(BLOCKS, BLOCK_SIZE, enable_prefix_caching=False)
    seq = engine_seq("spec", prompt, max_tokens)
    cache = DraftSequence("spec", prompt)  # the target's cache view: tokens fed so far, block table
    blocks.allocate(cache)
    logits = runner.prefill_span(cache, 0, cache.num_tokens)[-1:]
    seq.output_ids.append(int(logits.argmax()))
    cache.num_cached = cache.num_tokens
    drafted = accepted = 0
    while len(seq.output_ids) < max_tokens:
        [draft] = proposer.propose([seq], [min(k, max_tokens - len(seq.output_ids) - 1)])
        cache.output_ids = seq.output_ids + draft
        while len(cache.block_ids) * BLOCK_SIZE < cache.num_tokens:
            blocks.append(cache)
        start = len(prompt) + len(seq.output_ids) - 1  # the last token, then the draft
        logits = runner.prefill_span(cache, start, cache.num_tokens)
        if draft:
            [verdict], failed = verify(logits, [seq], [draft])
            assert not failed
            tokens = verdict.tokens
            drafted, accepted = drafted + len(draft), accepted + verdict.num_accepted
        else:
            tokens = [int(logits[-1].argmax())]
        seq.output_ids += tokens
        cache.num_cached = len(prompt) + len(seq.output_ids) - 1  # rejected positions are recomputed
    proposer.free("spec")
    return seq.output_ids, drafted, accepted


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_greedy_equals_generate(hf_model, target_runner, draft_proposer, reference_greedy, method):
    _, tokenizer = hf_model
    proposer = draft_proposer if method == "draft_model" else NgramProposer(SpeculativeConfig())
    for text in ["Fix the typo in this code:\n" + CODE + "\nFixed:\n", "the quick brown fox jumps over"]:
        prompt = tokenizer.encode(text)
        tokens, drafted, accepted = speculative_greedy(target_runner, proposer, prompt, 60, k=4)
        assert tokens == reference_greedy(prompt, 60)
        assert drafted > 0 and accepted > 0  # the verified path really ran, with multi-token steps
        if method == "draft_model":
            assert accepted >= 0.9 * drafted  # its own draft: it agrees but for float noise at near-ties


def test_tokenizers_match(hf_model):
    _, tokenizer = hf_model
    assert tokenizers_match(tokenizer, tokenizer) is None
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    assert "eos token id" in tokenizers_match(tokenizer, other)
    other.add_tokens(["<extra>"])
    assert "vocabulary" in tokenizers_match(tokenizer, other)


def test_the_draft_declines_when_its_cache_is_full(hf_model):
    model, tokenizer = hf_model
    small = DraftModelProposer(model, num_blocks=3, block_size=BLOCK_SIZE)
    fits, too_long = engine_seq("a", tokenizer.encode("x = 1"), 10), engine_seq("b", list(range(10, 90)), 10)
    drafts = small.propose([fits, too_long], [3, 3])
    assert len(drafts[0]) == 3 and drafts[1] == []
