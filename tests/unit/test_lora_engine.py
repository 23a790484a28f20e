"""Multi-LoRA in the engine (no Ray): a batch mixing adapters and the base model decodes in the same
steps, and every sequence's greedy output equals peft's merged model `generate`, token for token."""

import pytest

from app.config import EngineConfig, LoraConfig
from app.engine.engine import LLMEngine
from app.engine.lora import load_adapter
from tests.unit.lora_adapters import ADAPTERS, fresh_model, greedy_generate, make_adapters, merged
from tests.unit.test_engine import greedy, prompts, run_all


@pytest.fixture(scope="module")
def base(model_path):
    return fresh_model(model_path)


@pytest.fixture(scope="module")
def adapter_dirs(base, tmp_path_factory):
    return make_adapters(base, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def references(base, adapter_dirs):
    """name (None: the base model) -> greedy(prompt, n) of peft's merged model, memoized."""
    models = {None: base, **{name: merged(base, d) for name, d in adapter_dirs.items()}}
    memo = {}

    def reference(name, prompt, n):
        key = (name, tuple(prompt), n)
        if key not in memo:
            memo[key] = greedy_generate(models[name], prompt, n)
        return memo[key]

    return reference


def lora_engine(model_path, slots: int = 4, **engine) -> LLMEngine:
    model = fresh_model(model_path)  # its own copy: the engine wraps its Linear layers
    from transformers import AutoTokenizer

    config = EngineConfig(**{"max_num_seqs": 16, "max_model_len": 512, **engine}).resolved(1024)
    return LLMEngine(model, AutoTokenizer.from_pretrained(model_path), config,
                     lora=LoraConfig(max_adapters_per_replica=slots, max_rank=16))


def step_then_run(engine) -> dict[str, list[int]]:
    """One step (the caller looks at the engine after it), then the rest: every request's tokens."""
    first = {out.request_id: out.token_ids for out in engine.step()}
    return first


def finish(engine, first: dict[str, list[int]]) -> dict[str, list[int]]:
    rest = run_all(engine)
    return {rid: first.get(rid, []) + rest.get(rid, []) for rid in {*first, *rest}}


def load_all(engine, adapter_dirs):
    return {name: load_adapter(name, str(d), engine.model, 16) for name, d in adapter_dirs.items()}


def test_mixed_batch_equals_peft_merged(model_path, hf_model, adapter_dirs, references):
    engine = lora_engine(model_path)
    adapters = load_all(engine, adapter_dirs)
    ps = prompts(hf_model[1], 10, seed=3)
    names = [None, *ADAPTERS, *ADAPTERS, None]  # 4 adapters twice, base twice, all in one batch
    for i, (p, name) in enumerate(zip(ps, names)):
        engine.add_request(str(i), p, greedy(12 + i), lora=adapters.get(name))
    first = step_then_run(engine)  # one prefill admits them all: they decode together from here on
    assert len(engine.scheduler.running) == len(names)
    assert sorted(engine.lora_stats()["running"]) == sorted(ADAPTERS)
    outputs = finish(engine, first)
    for i, (p, name) in enumerate(zip(ps, names)):
        assert outputs[str(i)] == references(name, p, 12 + i), f"request {i} ({name or 'base'}) diverged"
    # the adapters change the output (a zero adapter would pass the check above trivially)
    assert all(references(name, ps[0], 12) != references(None, ps[0], 12) for name in ADAPTERS)
    stats = engine.lora_stats()
    assert (stats["running"], stats["waiting"], stats["loads"], stats["evictions"]) == ([], [], 4, 0)
    assert sorted(stats["loaded"]) == sorted(ADAPTERS) and stats["max_lora"] == 4


def test_prefix_cache_is_per_adapter(model_path, hf_model, adapter_dirs, references):
    engine = lora_engine(model_path)
    adapters = load_all(engine, adapter_dirs)
    prompt = prompts(hf_model[1], 1, seed=5)[0] * 3  # several full blocks
    assert len(prompt) > 3 * engine.config.block_size
    kv = {}
    for run, name in enumerate(["qv4", "qv4", "all8rs", None]):
        hits = engine.blocks.prefix_hits
        engine.add_request(str(run), prompt, greedy(6), lora=adapters.get(name))
        first = step_then_run(engine)
        blocks = engine.sequences[str(run)].block_ids[:2]
        kv[run] = [engine.runner.cache.v[0][b * 16:(b + 1) * 16].clone() for b in blocks]
        assert finish(engine, first)[str(run)] == references(name, prompt, 6), (run, name)
        shared = engine.blocks.prefix_hits - hits
        assert shared == (len(prompt) - 1) // 16 if run == 1 else shared == 0, (run, name, shared)
    # the same tokens under another adapter (qv4 changes v_proj) have other values in the cache
    assert not any(a.equal(b) for a, b in zip(kv[0], kv[2]))
    assert all(a.equal(b) for a, b in zip(kv[0], kv[1]))  # the same adapter shares its blocks


def test_outputs_after_prefix_reuse_stay_exact(model_path, hf_model, adapter_dirs, references):
    engine = lora_engine(model_path)
    adapters = load_all(engine, adapter_dirs)
    prompt = prompts(hf_model[1], 1, seed=6)[0] * 3
    for run, name in enumerate(["ku2", None, "ku2", "od16", None]):
        engine.add_request(str(run), prompt, greedy(8), lora=adapters.get(name))
        assert run_all(engine)[str(run)] == references(name, prompt, 8), (run, name)


def test_eviction_and_reload_with_two_slots(model_path, hf_model, adapter_dirs, references):
    engine = lora_engine(model_path, slots=2)
    adapters = load_all(engine, adapter_dirs)
    ps = prompts(hf_model[1], 8, seed=7)
    # three adapters at once on two slots: the third waits (not failed) until a slot is free
    order = ["qv4", "all8rs", "od16", None, "qv4", "od16", "all8rs", "qv4"]
    for i, (p, name) in enumerate(zip(ps, order)):
        engine.add_request(str(i), p, greedy(10 + 3 * i), lora=adapters.get(name))
    first = step_then_run(engine)
    stats = engine.lora_stats()
    assert len(stats["running"]) == 2 and stats["waiting"], stats
    outputs = finish(engine, first)
    for i, (p, name) in enumerate(zip(ps, order)):
        assert outputs[str(i)] == references(name, p, 10 + 3 * i), f"request {i} ({name}) diverged"
    stats = engine.lora_stats()
    assert stats["evictions"] >= 1 and stats["loads"] == 2 + stats["evictions"], stats
    # back to the first adapter after it was evicted: reloaded, still exact
    engine.add_request("again", ps[0], greedy(10), lora=adapters["qv4"])
    engine.add_request("ku2", ps[1], greedy(10), lora=adapters["ku2"])
    outputs = run_all(engine)
    assert outputs["again"] == references("qv4", ps[0], 10)
    assert outputs["ku2"] == references("ku2", ps[1], 10)
    assert engine.lora_stats()["loaded"][-1] in ("qv4", "ku2") and len(engine.lora_stats()["loaded"]) == 2


def test_unload_waits_for_running_sequences(model_path, hf_model, adapter_dirs, references):
    engine = lora_engine(model_path)
    adapters = load_all(engine, adapter_dirs)
    p = prompts(hf_model[1], 1, seed=8)[0]
    engine.add_request("a", p, greedy(6), lora=adapters["od16"])
    first = step_then_run(engine)
    assert engine.unload_lora("od16") is False  # in use: it stays
    assert finish(engine, first)["a"] == references("od16", p, 6)
    assert engine.unload_lora("od16") is True
    assert engine.lora_stats()["loaded"] == []
    engine.add_request("b", p, greedy(6), lora=adapters["od16"])  # loaded again on use
    assert run_all(engine)["b"] == references("od16", p, 6)
    assert engine.lora_stats()["loads"] == 2


def test_speculative_decoding_verifies_through_the_adapter(model_path, hf_model, adapter_dirs, references):
    engine = lora_engine(model_path, speculative={"method": "ngram", "min_acceptance_rate": 0})
    adapters = load_all(engine, adapter_dirs)
    ps = [p * 2 for p in prompts(hf_model[1], 3, seed=9)]  # repeats: the n-gram proposer finds drafts
    names = ["all8rs", None, "qv4"]
    for i, (p, name) in enumerate(zip(ps, names)):
        engine.add_request(str(i), p, greedy(16), lora=adapters.get(name))
    outputs = run_all(engine)
    for i, (p, name) in enumerate(zip(ps, names)):
        assert outputs[str(i)] == references(name, p, 16), f"request {i} ({name}) diverged"
    assert engine.stats().spec.num_draft_tokens > 0


def test_prompt_logprobs_score_through_the_adapter(model_path, hf_model, base, adapter_dirs):
    import torch

    from app.engine.sampling_params import SamplingParams

    engine = lora_engine(model_path)
    adapters = load_all(engine, adapter_dirs)
    prompt = prompts(hf_model[1], 1, seed=10)[0]
    engine.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                       lora=adapters["all8rs"])
    scored = [step for step in engine.step() if step.request_id == "p"][0].prompt_logprobs
    run_all(engine)
    with torch.inference_mode():
        logits = merged(base, adapter_dirs["all8rs"])(torch.tensor([prompt])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    got = torch.tensor([lp.chosen.logprob for lp in scored[1:]])
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
