"""Speculative decoding inside the engine (issue 20): output with speculation is what plain decoding gives,
token for token, whatever else is in the batch, under preemption and prefix reuse, for both proposers."""

import random

import pytest

from app.config import EngineConfig
from app.engine.engine import LLMEngine
from app.engine.sampling_params import GuidedDecoding, SamplingParams

BLOCKS = 64  # small enough that the preemption test's 16 requests cannot all hold their blocks


@pytest.fixture(scope="module")
def engines(hf_model, model_path):
    """One engine per way of decoding; each test's requests finish, so the engines are reused."""
    model, tokenizer = hf_model

    def build(speculative):
        config = EngineConfig(max_num_seqs=16, max_model_len=512, num_kv_blocks=BLOCKS,
                              speculative=speculative).resolved(1024)
        return LLMEngine(model, tokenizer, config)

    # disable_by_batch_size null: the batches here are large, and speculation must run in them
    return {
        "plain": build(None),
        "ngram": build({"method": "ngram", "disable_by_batch_size": None}),
        # the target as its own draft: every draft token stands, the most multi-token runs
        "draft_model": build({"method": "draft_model", "draft_model": model_path, "disable_by_batch_size": None}),
    }


def run_all(engine: LLMEngine) -> dict[str, dict]:
    """Each request's tokens, text, finish and stop reasons and log-probs, gathered over every step."""
    results: dict[str, dict] = {}
    for _ in range(10_000):
        if not engine.has_work():
            break
        for out in engine.step():
            assert out.error is None, out.error
            r = results.setdefault(out.request_id, {"tokens": [], "text": "", "logprobs": []})
            r["tokens"] += out.token_ids
            r["text"] += out.text
            r["logprobs"] += out.logprobs or []
            r["finish_reason"], r["stop_reason"] = out.finish_reason, out.stop_reason
    assert engine.stats().kv_blocks_used == 0
    return results


def words(n: int, rng: random.Random) -> str:
    vocab = "the quick brown fox jumps over lazy dogs while python code returns values".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def greedy(max_tokens: int, **more) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, min_tokens=max_tokens, **more)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_equals_generate_under_batching_preemption_and_prefix_reuse(engines, hf_model, reference_greedy,
                                                                          method):
    engine, tokenizer = engines[method], hf_model[1]
    rng = random.Random(3)
    shared = tokenizer.encode(words(60, rng))[:48]  # three full blocks every prompt starts with
    assert len(shared) == 48
    prompts = [shared + tokenizer.encode(" " + words(rng.randint(2, 50), rng)) for _ in range(16)]
    lengths = [8 + 3 * i for i in range(16)]
    before = engine.stats()
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add_request(str(i), p, greedy(n))
    results = run_all(engine)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert results[str(i)]["tokens"] == reference_greedy(p, n), f"request {i} diverged"
    after = engine.stats()
    assert after.num_preemptions > before.num_preemptions  # the cache was too small for all 16 at once
    assert after.prefix_hits > before.prefix_hits  # later prompts shared the first one's prefix blocks
    accepted = after.spec.num_accepted_tokens - before.spec.num_accepted_tokens
    drafts = after.spec.num_drafts - before.spec.num_drafts
    assert drafts > 0 and accepted > drafts  # multi-token steps happened, more than one token per draft
    if method == "draft_model":  # the target drafting for itself agrees with itself
        assert after.spec.num_draft_tokens - before.spec.num_draft_tokens == accepted


def test_seeded_sampled_request_same_alone_as_in_a_full_batch(engines, hf_model):
    engine, tokenizer = engines["ngram"], hf_model[1]
    rng = random.Random(5)
    prompt = tokenizer.encode(words(12, rng))
    params = dict(max_tokens=24, temperature=0.8, top_p=0.95, seed=1234, ignore_eos=True)
    engine.add_request("seeded", prompt, SamplingParams(**params))
    alone = run_all(engine)["seeded"]
    engine.add_request("seeded", prompt, SamplingParams(**params))
    for i in range(15):
        engine.add_request(f"other{i}", tokenizer.encode(words(rng.randint(2, 14), rng)),
                           SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True))
    batched = run_all(engine)["seeded"]
    assert batched["tokens"] == alone["tokens"] and batched["text"] == alone["text"]
    assert engine.gate.history == {}  # every request's speculative state went with it


def _same_requests(engines, method: str, requests: list[tuple[str, list[int], SamplingParams]]):
    outputs = {}
    for name in ("plain", method):
        for request_id, prompt, params in requests:
            engines[name].add_request(request_id, prompt, params)
        outputs[name] = run_all(engines[name])
    return outputs["plain"], outputs[method]


def test_stop_strings_and_logprobs_behave_as_without_speculation(engines, hf_model):
    tokenizer = hf_model[1]
    rng = random.Random(8)
    prompts = [tokenizer.encode(words(rng.randint(4, 30), rng)) for _ in range(4)]
    probe, _ = _same_requests(engines, "ngram", [(str(i), p, greedy(40)) for i, p in enumerate(prompts)])
    # a stop string from the middle of each output: plain decoding stops there, so must speculation
    stops = [probe[str(i)]["text"][len(probe[str(i)]["text"]) // 2:][:3] for i in range(len(prompts))]
    requests = [(str(i), p, SamplingParams(max_tokens=40, temperature=0.0, stop=[s], logprobs=2))
                for i, (p, s) in enumerate(zip(prompts, stops))]
    plain, spec = _same_requests(engines, "ngram", requests)
    assert any(plain[str(i)]["finish_reason"] == "stop" for i in range(len(prompts)))
    for i in range(len(prompts)):
        a, b = plain[str(i)], spec[str(i)]
        assert (b["tokens"], b["text"], b["finish_reason"], b["stop_reason"]) == \
            (a["tokens"], a["text"], a["finish_reason"], a["stop_reason"])
        assert len(b["logprobs"]) == len(b["tokens"])
        for x, y in zip(a["logprobs"], b["logprobs"]):
            assert y.chosen.token_id == x.chosen.token_id
            assert y.chosen.logprob == pytest.approx(x.chosen.logprob, abs=1e-4)
            assert [t.token_id for t in y.top] == [t.token_id for t in x.top]


def test_json_schema_request_decodes_plainly_and_as_without_speculation(engines):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}},
              "required": ["n", "s"]}
    params = SamplingParams(max_tokens=48, temperature=0.0, guided=GuidedDecoding(schema, param="response_format"))
    before = engines["ngram"].stats().spec.num_drafts
    plain, spec = _same_requests(engines, "ngram", [("json", [1, 2, 3, 4], params)])
    assert spec["json"]["tokens"] == plain["json"]["tokens"] and spec["json"]["text"].startswith("{")
    assert engines["ngram"].stats().spec.num_drafts == before  # a guided request never drafts


def test_counters_become_vllm_metric_increments_and_status_shows_acceptance(monkeypatch):
    """The engine's cumulative counters reach the four vLLM counters as increments (what Ray's Counter
    receives is recorded here; tests/e2e/test_metrics.py covers the export), and `conduit status` reads
    acceptance from the exposition."""
    from rich.console import Console

    from app import metrics, status
    from app.engine.spec.stats import SpecDecodeStats

    recorded = []
    monkeypatch.setattr(metrics, "inc", lambda name, value, **tags: value > 0 and recorded.append((name, value, tags)))
    monkeypatch.setattr(metrics, "start_at_zero", lambda name, **tags: recorded.append((name, 0, tags)))
    monkeypatch.setattr(metrics.ModelMetrics, "_record_scheduling", lambda self, stats: None)
    monkeypatch.setattr(metrics, "ray_metric", lambda name: type("M", (), {"set": lambda *a, **k: None})())
    m = metrics.ModelMetrics("demo", "r1", 16)
    spec = SpecDecodeStats()

    class Stats:
        num_running = num_waiting = kv_blocks_used = prefix_queries = prefix_hits = num_preemptions = 0
        kv_blocks_total = 1

    for drafted, accepted in ((4, 4), (4, 1), (2, 0)):
        spec.record(drafted, accepted)
        Stats.spec = spec.snapshot()
        m.record_stats(Stats)
    totals: dict = {}
    for name, value, tags in recorded:
        key = (name, tags.get("position"))
        totals[key] = totals.get(key, 0) + value
    assert totals[("vllm:spec_decode_num_drafts", None)] == 3
    assert totals[("vllm:spec_decode_num_draft_tokens", None)] == 10
    assert totals[("vllm:spec_decode_num_accepted_tokens", None)] == 5
    assert [totals[("vllm:spec_decode_num_accepted_tokens_per_pos", str(j))] for j in range(4)] == [2, 1, 1, 1]

    labels = 'model_name="demo",engine="r1"'
    exposition = "".join(f"# TYPE {n} counter\n{n}_total{{{labels}}} {v}\n" for n, v in (
        ("vllm:spec_decode_num_drafts", 3), ("vllm:spec_decode_num_draft_tokens", 10),
        ("vllm:spec_decode_num_accepted_tokens", 5)))
    exposition += "# TYPE vllm:spec_decode_num_drafts counter\nvllm:spec_decode_num_drafts_total 0\n"  # never counted
    gauges = status.replica_gauges(exposition)[("demo", "r1")]
    assert status._acceptance(gauges) == "50% (2.67 tok/draft)"
    console = Console(record=True, width=200)
    status.render(type("S", (), {"applications": {}})(), {("demo", "r1"): gauges}, console)
    assert "50% (2.67 tok/draft)" in console.export_text()


def test_a_draft_with_another_vocabulary_stops_the_replica_from_starting(hf_model, model_path, tmp_path):
    """The replica-start twin of `conduit validate`'s check (tests/unit/test_cli_validate_draft.py)."""
    import shutil

    from transformers import AutoTokenizer

    model, tokenizer = hf_model
    draft = tmp_path / "draft"
    shutil.copytree(model_path, draft)
    other = AutoTokenizer.from_pretrained(draft)
    other.add_tokens(["<not-in-the-target>"])
    other.save_pretrained(draft)
    config = EngineConfig(max_model_len=256, num_kv_blocks=16,
                          speculative={"method": "draft_model", "draft_model": str(draft)}).resolved(1024)
    with pytest.raises(ValueError, match="engine.speculative.draft_model: .*different vocabulary"):
        LLMEngine(model, tokenizer, config)
