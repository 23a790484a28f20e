"""Speculative decoding's parts without a model: the config, the n-gram proposer, verification (greedy
exactness, rejection sampling keeping the target's distribution), the counters and the gate."""

import random

import pytest
import torch
from pydantic import ValidationError
from scipy.stats import chi2_contingency, chisquare

from app.config import SpeculativeConfig
from app.engine.sampler import sample
from app.engine.sampling_params import SamplingParams
from app.engine.sequence import Sequence
from app.engine.spec.gate import FIRST_PAUSE_STEPS, SpecGate
from app.engine.spec.ngram import NgramIndex, NgramProposer
from app.engine.spec.stats import SpecDecodeStats
from app.engine.spec.verify import greedy_verdict, rejection_sample, verify

VOCAB, EOS = 8, 7


def make_seq(request_id="r", prompt=(1, 2, 3), output=(), **params) -> Sequence:
    seq = Sequence(request_id, list(prompt), SamplingParams(**params), None, frozenset({EOS}))
    seq.output_ids = list(output)
    return seq


# config -------------------------------------------------------------------------------------------
def test_config_defaults_and_field_errors():
    assert SpeculativeConfig().method == "ngram"
    with pytest.raises(ValidationError, match="prompt_lookup_min"):
        SpeculativeConfig(prompt_lookup_min=5, prompt_lookup_max=3)
    with pytest.raises(ValidationError, match="needs draft_model"):
        SpeculativeConfig(method="draft_model")
    with pytest.raises(ValidationError, match="num_speculative_tokens"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValidationError, match="extra"):
        SpeculativeConfig(num_spec_tokens=3)
    assert SpeculativeConfig(method="draft_model", draft_model="/models/small").draft_model == "/models/small"


# n-gram proposer -----------------------------------------------------------------------------------
def brute_force_draft(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The definition, scanned from scratch: latest earlier occurrence of the longest suffix that has one."""
    length = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if n > length:
            continue
        suffix = tokens[length - n :]
        for end in range(length - 1, n - 1, -1):
            if tokens[end - n : end] == suffix:
                extended = list(tokens)
                for pos in range(end, end + k):
                    extended.append(extended[pos])
                return extended[length:]
    return []


def test_ngram_copies_what_followed_the_latest_match():
    index = NgramIndex(1, 3)
    index.sync([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6], [])
    # suffix (5, 6) last occurred at positions 5-6, followed by 7, 1, 2 (the 3-gram (2, 5, 6) never did)
    assert index.propose(3) == [7, 1, 2]


def test_ngram_prefers_the_longest_suffix():
    index = NgramIndex(1, 3)
    index.sync([1, 2, 3, 9, 4, 2, 3, 8, 1, 2, 3], [])
    # (2, 3) last occurred before 8, but (1, 2, 3) occurred before 9
    assert index.propose(2) == [9, 4]


def test_ngram_no_match_and_min_size():
    index = NgramIndex(2, 3)
    index.sync([1, 2, 3, 4, 3], [])
    assert index.propose(4) == []  # only the 1-gram (3) recurs, below prompt_lookup_min
    one = NgramIndex(1, 3)
    one.sync([1, 2, 3, 4, 3], [])
    assert one.propose(2) == [4, 3]


def test_ngram_a_repeating_run_continues_past_the_end():
    index = NgramIndex(1, 2)
    index.sync([4, 1, 2, 1, 2], [])
    assert index.propose(5) == [1, 2, 1, 2, 1]


def test_ngram_index_equals_a_fresh_scan_as_the_output_grows():
    rng = random.Random(0)
    for trial in range(20):
        min_n, max_n = rng.randint(1, 2), rng.randint(2, 4)
        prompt = [rng.randrange(6) for _ in range(rng.randint(1, 40))]
        proposer = NgramProposer(SpeculativeConfig(prompt_lookup_min=min_n, prompt_lookup_max=max_n))
        seq = make_seq(str(trial), prompt)
        for _ in range(40):
            k = rng.randint(1, 6)
            [draft] = proposer.propose([seq], [k])
            assert draft == brute_force_draft(seq.token_ids, k, min_n, max_n)
            seq.output_ids.extend(rng.randrange(6) for _ in range(rng.randint(1, 3)))
        proposer.free(str(trial))
    assert proposer.indexes == {}


def test_ngram_zero_budget_proposes_nothing():
    proposer = NgramProposer(SpeculativeConfig())
    assert proposer.propose([make_seq(prompt=[1, 2, 1, 2])], [0]) == [[]]


# greedy verification --------------------------------------------------------------------------------
def test_greedy_verdict_keeps_the_agreeing_prefix_and_the_targets_token():
    assert greedy_verdict([4, 5, 6], [4, 5, 1, 2]).tokens == [4, 5, 1]
    assert greedy_verdict([4, 5, 6], [4, 5, 6, 2]).tokens == [4, 5, 6, 2]  # all stand: the bonus token
    assert greedy_verdict([4, 5, 6], [3, 5, 6, 2]).tokens == [3]
    assert greedy_verdict([4, 5, 6], [4, 5, 6, 2]).num_accepted == 3


def plain_greedy_run(logits: torch.Tensor, seq: Sequence) -> list[int]:
    """What plain decoding chooses at each of the rows, feeding back its own choices."""
    chosen = []
    base = list(seq.output_ids)
    for j in range(logits.shape[0]):
        seq.output_ids = base + chosen
        [token], failed = sample(logits[j : j + 1].clone(), [seq])
        assert not failed
        chosen.append(token)
    seq.output_ids = base
    return chosen


@pytest.mark.parametrize("params", [
    {},
    {"repetition_penalty": 1.8},
    {"presence_penalty": 1.5, "frequency_penalty": 0.7},
    {"min_tokens": 4},  # positions 0 and 1 still may not end it; position 2 may
])
def test_greedy_verification_equals_plain_decoding_position_by_position(params):
    torch.manual_seed(0)
    for trial in range(30):
        seq = make_seq(f"g{trial}", prompt=[1, 2, 3, 2], output=[5, 2], temperature=0.0, **params)
        logits = torch.randn(4, VOCAB) * 2
        logits[:, EOS] += 4.0 if "min_tokens" in params else 0.0  # EOS would win where it is allowed
        plain = plain_greedy_run(logits, seq)
        for agree in range(4):  # the draft agrees with plain decoding for `agree` tokens, then differs
            draft = plain[:agree] + [(plain[agree] + 1) % VOCAB] * (agree < 3)
            draft = draft[:3]
            [verdict], failed = verify(logits.clone(), [seq], [draft])
            assert not failed
            assert verdict.tokens == plain[: len(verdict.tokens)]
            assert verdict.num_accepted == min(agree, 3)
            assert len(verdict.tokens) == verdict.num_accepted + 1


def test_verify_rejects_guided_and_empty_drafts():
    seq = make_seq(temperature=0.0)
    with pytest.raises(ValueError, match="draft"):
        verify(torch.zeros(1, VOCAB), [seq], [[]])
    seq.matcher = object()  # guided: decodes plainly, never verified
    with pytest.raises(ValueError, match="unguided"):
        verify(torch.zeros(2, VOCAB), [seq], [[1]])


def test_a_row_whose_controls_fail_fails_that_sequence_alone():
    good, bad = make_seq("good", temperature=0.0), make_seq("bad", temperature=1.0)
    logits = torch.randn(4, VOCAB)
    logits[2:] = float("nan")  # the sampled sequence's rows
    verdicts, failed = verify(logits, [good, bad], [[1], [1]])
    assert list(failed) == [1] and verdicts[0] is not None and verdicts[1] is None


# rejection sampling -------------------------------------------------------------------------------------
DRAWS = 2000


def distributions(seed: int, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k + 1, VOCAB, generator=g) * 1.2, dim=-1)
    q = torch.softmax(torch.randn(k, VOCAB, generator=g) * 1.2, dim=-1)
    return p, q


def speculative_draws(p, q, one_hot_draft: int | None = None) -> tuple[list[int], list[int]]:
    """DRAWS verified steps at a fixed seed: (each step's first emitted token, the second where one was)."""
    g = torch.Generator().manual_seed(1234)
    firsts, seconds = [], []
    for _ in range(DRAWS):
        if one_hot_draft is None:
            draft = torch.multinomial(q, 1, generator=g)[:, 0].tolist()
        else:
            draft = [one_hot_draft] * q.shape[0]
        verdict = rejection_sample(p, draft, None if one_hot_draft is not None else q, g)
        firsts.append(verdict.tokens[0])
        if len(verdict.tokens) > 1:
            seconds.append(verdict.tokens[1])
    return firsts, seconds


def counts(tokens: list[int]) -> list[int]:
    return torch.bincount(torch.tensor(tokens), minlength=VOCAB).tolist()


def fits(tokens: list[int], probs: torch.Tensor) -> float:
    """chi-squared goodness of fit of the tokens' histogram to `probs`: the p-value."""
    expected = (probs.double() / probs.double().sum() * len(tokens)).tolist()
    return chisquare(counts(tokens), expected).pvalue


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft-probabilities", "one-hot-draft"])
def test_rejection_sampling_keeps_the_target_distribution(one_hot):
    p, q = distributions(seed=7)
    one_hot_draft = int(p[0].argmax()) if one_hot else None  # an n-gram draft: a likely token, always the same
    firsts, seconds = speculative_draws(p, q, one_hot_draft)
    # the first emitted token follows p[0]; after an accepted first draft, the next follows p[1]
    assert fits(firsts, p[0]) > 0.001
    assert len(seconds) > 200 and fits(seconds, p[1]) > 0.001
    # and matches plain sampling from the same distribution (two-sample test)
    plain = torch.multinomial(p[0], DRAWS, replacement=True, generator=torch.Generator().manual_seed(99)).tolist()
    table = [[a, b] for a, b in zip(counts(firsts), counts(plain)) if a + b > 0]
    assert chi2_contingency(table).pvalue > 0.001


def test_the_chi_squared_test_catches_a_sampler_that_accepts_every_draft():
    """The test above has power: emitting the draft token unchecked (q's distribution) fails it."""
    p, q = distributions(seed=7)
    g = torch.Generator().manual_seed(1234)
    accepted_blindly = [int(torch.multinomial(q[0], 1, generator=g)) for _ in range(DRAWS)]
    assert fits(accepted_blindly, p[0]) < 1e-6


def test_rejection_sampling_is_reproducible_for_a_seed():
    p, q = distributions(seed=3, k=4)
    draft = [1, 2, 3, 4]
    run = [rejection_sample(p, draft, q, torch.Generator().manual_seed(5)).tokens for _ in range(2)]
    assert run[0] == run[1]
    others = {tuple(rejection_sample(p, draft, q, torch.Generator().manual_seed(s)).tokens) for s in range(20)}
    assert len(others) > 1  # the seed does decide


def test_a_seeded_sequence_verifies_the_same_alone_as_in_a_batch():
    torch.manual_seed(0)
    drafts = [[1, 2, 3], [4, 5], [6, 1, 2, 3, 4]]
    logits = torch.randn(sum(len(d) + 1 for d in drafts), VOCAB)

    def batch():
        return [make_seq(f"s{i}", temperature=0.9, top_p=0.9, seed=i) for i in range(3)]

    together, _ = verify(logits.clone(), batch(), drafts)
    for i, seq in enumerate(batch()):
        start = sum(len(d) + 1 for d in drafts[:i])
        [alone], _ = verify(logits[start : start + len(drafts[i]) + 1].clone(), [seq], [drafts[i]])
        assert alone == together[i]


def test_a_draft_the_target_would_never_sample_is_always_rejected():
    p = torch.zeros(3, VOCAB)
    p[:, 0] = 1.0  # the target (after top-k 1, say) only ever emits token 0
    for seed in range(50):
        verdict = rejection_sample(p, [5, 0], None, torch.Generator().manual_seed(seed))
        assert verdict.tokens == [0] and verdict.num_accepted == 0


# counters and the gate --------------------------------------------------------------------------------
def test_stats_count_drafts_tokens_and_acceptance_per_position():
    stats = SpecDecodeStats()
    stats.record(4, 4)
    stats.record(4, 1)
    stats.record(2, 0)
    snapshot = stats.snapshot()
    stats.record(3, 3)  # after the snapshot: not in it
    assert (snapshot.num_drafts, snapshot.num_draft_tokens, snapshot.num_accepted_tokens) == (3, 10, 5)
    assert snapshot.accepted_per_position == [2, 1, 1, 1]
    assert snapshot.acceptance_rate == 0.5
    assert snapshot.mean_acceptance_length == pytest.approx(1 + 5 / 3)
    assert snapshot.summary()["acceptance_rate"] == 0.5


def test_gate_steps_aside_for_large_batches_but_not_for_seeded_requests():
    gate = SpecGate(SpeculativeConfig(num_speculative_tokens=4, disable_by_batch_size=3), max_model_len=512)
    small = [make_seq(f"a{i}", max_tokens=100) for i in range(2)]
    assert gate.budgets(small) == [4, 4]
    large = [make_seq(f"b{i}", max_tokens=100) for i in range(2)] + [make_seq("seeded", max_tokens=100, seed=1)]
    assert gate.budgets(large) == [0, 0, 4]


def test_gate_never_drafts_past_max_tokens_or_the_context_window():
    config = SpeculativeConfig(num_speculative_tokens=4, disable_by_batch_size=None)
    gate = SpecGate(config, max_model_len=512)
    assert gate.budgets([make_seq("m", output=[1] * 7, max_tokens=10)]) == [2]  # 3 left: 2 drafts + its own
    assert gate.budgets([make_seq("last", output=[1] * 9, max_tokens=10)]) == [0]
    assert SpecGate(config, max_model_len=12).budgets([make_seq("ctx", prompt=[1] * 9, max_tokens=100)]) == [2]
    guided = make_seq("guided", max_tokens=100)
    guided.matcher = object()
    assert gate.budgets([guided]) == [0]


def test_gate_pauses_a_sequence_whose_drafts_keep_failing_and_retries_later():
    gate = SpecGate(SpeculativeConfig(min_acceptance_rate=0.5, disable_by_batch_size=None), max_model_len=512)
    seq = make_seq("x", max_tokens=1000)

    def steps_without_drafts() -> int:
        steps = 0
        while gate.budgets([seq]) != [4]:
            steps += 1
        return steps

    assert steps_without_drafts() == 0
    gate.record("x", 4, 0)  # average 1 -> 0.7: still drafting
    assert steps_without_drafts() == 0
    gate.record("x", 4, 0)  # 0.49: below the floor
    assert steps_without_drafts() == FIRST_PAUSE_STEPS
    gate.record("x", 4, 0)  # fails again on resuming: twice as long
    assert steps_without_drafts() == 2 * FIRST_PAUSE_STEPS
    gate.record("x", 4, 4)  # a good draft: back above the floor, and the next pause starts short again
    assert gate.history["x"].pause == FIRST_PAUSE_STEPS
    gate.free("x")
    assert gate.history == {}
