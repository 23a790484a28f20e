"""The engine without Ray: batching, preemption and prefix reuse must not change greedy output."""

import random

import pytest

from app.config import EngineConfig
from app.engine.engine import LLMEngine
from app.engine.sampling_params import SamplingParams


def make_engine(hf_model, **overrides) -> LLMEngine:
    model, tokenizer = hf_model
    config = EngineConfig(**{"max_num_seqs": 16, "max_model_len": 512, **overrides}).resolved(1024)
    return LLMEngine(model, tokenizer, config)


def run_all(engine: LLMEngine) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    text: dict[str, str] = {}
    for _ in range(10_000):
        if not engine.has_work():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
            text[out.request_id] = text.get(out.request_id, "") + out.text
    run_all.text = text
    return outputs


def prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dogs while python code returns values".split()
    return [tokenizer.encode(" ".join(rng.choice(words) for _ in range(rng.randint(3, 60)))) for _ in range(n)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, min_tokens=max_tokens)


def test_batched_greedy_equals_generate(hf_model, reference_greedy):
    engine = make_engine(hf_model)
    ps = prompts(hf_model[1], 10)
    lengths = [5 + 7 * i for i in range(len(ps))]
    for i, (p, n) in enumerate(zip(ps, lengths)):
        engine.add_request(str(i), p, greedy(n))
    outputs = run_all(engine)
    for i, (p, n) in enumerate(zip(ps, lengths)):
        assert outputs[str(i)] == reference_greedy(p, n), f"request {i} diverged"
    assert engine.stats().kv_blocks_used == 0


def test_requests_joining_a_running_batch(hf_model, reference_greedy):
    engine = make_engine(hf_model)
    ps = prompts(hf_model[1], 6, seed=1)
    outputs: dict[str, list[int]] = {}
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, greedy(20))
        for _ in range(3):  # let the batch run a few steps before the next request arrives
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.token_ids)
    for rid, toks in run_all(engine).items():
        outputs.setdefault(rid, []).extend(toks)
    for i, p in enumerate(ps):
        assert outputs[str(i)] == reference_greedy(p, 20)


def test_a_joining_prompt_prefills_in_the_running_sequences_decode_step(hf_model, reference_greedy):
    """Admitted prompts and the running sequences' next tokens share a forward while they fit the
    step's token budget; a prompt that does not fit with them prefills alone."""
    engine = make_engine(hf_model, max_prefill_tokens=64)
    words = prompts(hf_model[1], 8, seed=3)
    long_words = [t for p in words for t in p]
    ps = {"a": words[0][:10], "b": words[1][:10], "c": words[2][:10], "d": long_words[:63]}
    outputs: dict[str, list[int]] = {}

    def step_with(*names: str) -> set[str]:
        for name in names:
            engine.add_request(name, ps[name], greedy(12))
        ran = set()
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
            ran.add(out.request_id)
        return ran

    assert step_with("a", "b") == {"a", "b"}
    assert step_with("c") == {"a", "b", "c"}, "10 prompt tokens + 2 decodes fit 64: one forward"
    assert step_with("d") == {"d"}, "63 prompt tokens + 3 decodes do not: it prefills alone"
    assert step_with() == {"a", "b", "c", "d"}
    for rid, toks in run_all(engine).items():
        outputs[rid].extend(toks)
    for name, p in ps.items():
        assert outputs[name] == reference_greedy(p, 12), f"request {name} diverged"


def test_preemption_keeps_greedy_output(hf_model, reference_greedy):
    # 12 blocks of 16 tokens cannot hold 4 sequences growing to ~70 tokens: some get preempted
    engine = make_engine(hf_model, num_kv_blocks=12, block_size=16)
    ps = [p[:30] for p in prompts(hf_model[1], 4, seed=2)]
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, greedy(40))
    outputs = run_all(engine)
    assert engine.stats().num_preemptions > 0
    for i, p in enumerate(ps):
        assert outputs[str(i)] == reference_greedy(p, 40)


def test_prefix_reuse_keeps_greedy_output(hf_model, reference_greedy):
    engine = make_engine(hf_model)
    tokenizer = hf_model[1]
    system = tokenizer.encode("You are a helpful assistant that answers in python code. " * 6)
    questions = [tokenizer.encode(q) for q in [" What is a list?", " Sort a dict by value.", " Explain yield."]]
    engine.add_request("first", system + questions[0], greedy(12))
    run_all(engine)
    hits_before = engine.stats().prefix_hits
    for i, q in enumerate(questions[1:]):
        engine.add_request(str(i), system + q, greedy(12))
    outputs = run_all(engine)
    assert engine.stats().prefix_hits - hits_before >= 2 * (len(system) // 16)
    for i, q in enumerate(questions[1:]):
        assert outputs[str(i)] == reference_greedy(system + q, 12)


def test_running_sequences_share_prefix_blocks(hf_model, reference_greedy):
    engine = make_engine(hf_model, block_size=16)
    tokenizer = hf_model[1]
    system = tokenizer.encode("You are a helpful assistant that answers in python code. " * 6)[:64]  # 4 blocks
    engine.add_request("first", system + tokenizer.encode(" Hi."), greedy(4))
    run_all(engine)
    questions = [tokenizer.encode(q) for q in [" What is a list?", " Sort a dict by value.", " Explain yield."]]
    for i, q in enumerate(questions):
        engine.add_request(str(i), system + q, greedy(12))
    outputs = {}
    for out in engine.step():  # the prefill of all three
        outputs.setdefault(out.request_id, []).extend(out.token_ids)
    running = engine.scheduler.running
    shared = set(running[0].block_ids[:4])
    assert all(set(seq.block_ids[:4]) == shared for seq in running)  # one copy of the system prompt
    own = sum(len(seq.block_ids) - 4 for seq in running)
    assert engine.stats().kv_blocks_used == len(shared) + own
    for rid, toks in run_all(engine).items():
        outputs.setdefault(rid, []).extend(toks)
    for i, q in enumerate(questions):
        assert outputs[str(i)] == reference_greedy(system + q, 12)


def test_admission_counts_blocks_used_not_max_model_len(hf_model, reference_greedy):
    # 24 blocks of 16 tokens: a slot per sequence at max_model_len 512 would fit none; paged, 8 short
    # sequences (~40 tokens, 3 blocks each) all run in one batch
    engine = make_engine(hf_model, num_kv_blocks=24, block_size=16, max_model_len=512)
    ps = [p[:20] + [5] * (20 - len(p[:20])) for p in prompts(hf_model[1], 8, seed=6)]
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, greedy(20))
    outputs = {out.request_id: list(out.token_ids) for out in engine.step()}
    assert engine.stats().num_running == 8 and engine.stats().kv_blocks_used == 8 * 2
    assert engine.runner.cache.k[0].shape[0] == 24 * 16  # memory: the blocks, no more
    for rid, toks in run_all(engine).items():
        outputs[rid] += toks
    assert engine.stats().num_preemptions == 0
    for i, p in enumerate(ps):
        assert outputs[str(i)] == reference_greedy(p, 20)


def test_seeded_sampling_does_not_depend_on_the_batch(hf_model):
    ps = prompts(hf_model[1], 8, seed=3)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone = make_engine(hf_model)
    alone.add_request("x", ps[0], params)
    alone_out = run_all(alone)["x"]
    busy = make_engine(hf_model)
    for i, p in enumerate(ps[1:]):
        busy.add_request(str(i), p, SamplingParams(max_tokens=16, temperature=1.0, seed=i))
    busy.add_request("x", ps[0], params)
    assert run_all(busy)["x"] == alone_out
    other_seed = make_engine(hf_model)
    other_seed.add_request("x", ps[0], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=99))
    assert run_all(other_seed)["x"] != alone_out


def test_abort_frees_blocks(hf_model):
    engine = make_engine(hf_model)
    for i, p in enumerate(prompts(hf_model[1], 4, seed=4)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()
    assert engine.stats().num_running == 4 and engine.stats().kv_blocks_used > 0
    for i in range(4):
        engine.abort_request(str(i))
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
    assert not engine.has_work()


def test_stop_string_ends_and_is_not_emitted(hf_model, reference_greedy):
    engine = make_engine(hf_model)
    p = prompts(hf_model[1], 1, seed=5)[0]
    full = hf_model[1].decode(reference_greedy(p, 30), skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    assert stop.strip(), "reference text too short for this test"
    engine.add_request("s", p, SamplingParams(max_tokens=30, temperature=0.0, stop=[stop]))
    run_all(engine)
    text = run_all.text["s"]
    assert stop not in text
    assert full.startswith(text) and len(text) <= full.index(stop)


def test_too_long_request_is_refused(hf_model):
    engine = make_engine(hf_model, max_model_len=64)
    with pytest.raises(ValueError, match="context window"):
        engine.add_request("long", list(range(10, 60)), SamplingParams(max_tokens=20))


def test_sampling_controls_stay_per_request(hf_model, reference_greedy):
    """A greedy request's output is unchanged by sampled and penalised neighbours in its batch."""
    engine = make_engine(hf_model)
    ps = prompts(hf_model[1], 5, seed=6)
    engine.add_request("greedy", ps[0], greedy(20))
    engine.add_request("topk1", ps[0], SamplingParams(max_tokens=20, temperature=1.5, top_k=1, min_tokens=20))
    engine.add_request("hot", ps[1], SamplingParams(max_tokens=20, temperature=1.5, min_p=0.05))
    engine.add_request("pen", ps[2], SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.5,
                                                    presence_penalty=1.0, frequency_penalty=0.5, min_tokens=20))
    outputs = run_all(engine)
    assert outputs["greedy"] == reference_greedy(ps[0], 20)
    assert outputs["topk1"] == outputs["greedy"]  # top_k=1 is greedy whatever the temperature
    plain = reference_greedy(ps[2], 20)
    assert outputs["pen"] != plain  # the penalties did act on that row
    assert len(set(outputs["pen"])) >= len(set(plain))  # and they discourage repeats


def test_repetition_penalty_matches_transformers(hf_model):
    import torch

    model, tokenizer = hf_model
    p = prompts(tokenizer, 1, seed=7)[0]
    engine = make_engine(hf_model)
    engine.add_request("r", p, SamplingParams(max_tokens=15, temperature=0.0, repetition_penalty=1.3, min_tokens=15))
    with torch.inference_mode():
        ref = model.generate(torch.tensor([p]), max_new_tokens=15, min_new_tokens=15, do_sample=False,
                             repetition_penalty=1.3)[0, len(p):].tolist()
    assert run_all(engine)["r"] == ref
