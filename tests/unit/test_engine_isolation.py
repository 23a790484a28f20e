"""One request must never stop the engine: whatever fails for one sequence ends that sequence alone,
the loop goes on, and the rest of the batch keeps its greedy output (equal to `generate`)."""

import asyncio

import pytest
import torch

from app.engine import engine as engine_module
from app.engine.async_engine import AsyncEngine
from app.engine.errors import RequestRejected
from app.engine.sampling_params import SamplingParams
from tests.unit.test_engine import greedy, make_engine, prompts


def run_collecting(engine) -> tuple[dict[str, list[int]], dict[str, Exception]]:
    tokens, errors = {}, {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.error is not None:
                errors[out.request_id] = out.error
    return tokens, errors


def add_bystanders(engine, tokenizer, n: int = 8, max_tokens: int = 12) -> list[list[int]]:
    ps = prompts(tokenizer, n, seed=3)
    for i, p in enumerate(ps):
        engine.add_request(f"ok{i}", p, greedy(max_tokens))
    return ps


def assert_bystanders_greedy(tokens, ps, reference_greedy, max_tokens: int = 12):
    for i, p in enumerate(ps):
        assert tokens[f"ok{i}"] == reference_greedy(p, max_tokens), f"bystander {i} diverged"


@pytest.mark.parametrize("field, value", [("temperature", 1e-300), ("repetition_penalty", 1e-300)])
def test_nan_sampling_fails_only_its_own_sequence(hf_model, reference_greedy, field, value):
    """The review's triggers: 1e-300 is 0 in float32. Edge checks (app/api/bounds.py) refuse the
    penalty, so here it is set on the live sequence, as a caller that skipped them would."""
    engine = make_engine(hf_model)
    ps = add_bystanders(engine, hf_model[1])
    engine.add_request("bad", ps[0], SamplingParams(max_tokens=12, temperature=0.7, repetition_penalty=1.3))
    setattr(engine.sequences["bad"].params, field, value)
    tokens, errors = run_collecting(engine)
    assert_bystanders_greedy(tokens, ps, reference_greedy)
    if field == "temperature":  # below vLLM's epsilon a temperature is greedy: nothing fails
        assert not errors and len(tokens["bad"]) == 12
    else:  # inf logits, NaN probabilities: refused before the draw (on CUDA it would assert)
        assert set(errors) == {"bad"}
    assert engine.stats().kv_blocks_used == 0 and not engine.has_work()


def test_a_raising_sequence_step_fails_only_it(hf_model, reference_greedy):
    """A guided matcher (or detokenizer) that raises mid-stream: that request ends with the error."""

    class Broken:
        def mask(self, logits):
            raise RuntimeError("grammar state corrupted")

    engine = make_engine(hf_model)
    ps = add_bystanders(engine, hf_model[1])
    engine.add_request("bad", ps[1], greedy(12))
    engine.sequences["bad"].matcher = Broken()
    tokens, errors = run_collecting(engine)
    assert list(errors) == ["bad"] and "corrupted" in str(errors["bad"])
    assert_bystanders_greedy(tokens, ps, reference_greedy)


def test_forward_failure_of_one_sequence_fails_only_it(hf_model, reference_greedy, monkeypatch):
    """Out of memory on one request's forward (its prompt-logprob chunks): the batch is retried one
    sequence at a time and only that one fails."""
    engine = make_engine(hf_model)
    ps = add_bystanders(engine, hf_model[1])
    engine.add_request("bad", ps[2], SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1))

    def out_of_memory(seq, start, end):
        raise torch.OutOfMemoryError("CPU out of memory (test)")

    monkeypatch.setattr(engine.runner, "prefill_span", out_of_memory)
    tokens, errors = run_collecting(engine)
    assert list(errors) == ["bad"] and isinstance(errors["bad"], torch.OutOfMemoryError)
    assert_bystanders_greedy(tokens, ps, reference_greedy)


def test_decode_failure_in_a_batch_is_retried_one_by_one(hf_model, reference_greedy, monkeypatch):
    engine = make_engine(hf_model)
    ps = add_bystanders(engine, hf_model[1])
    engine.add_request("bad", ps[3], greedy(12))
    decode = engine.runner.decode

    def failing_with_bad(seqs):
        if any(seq.request_id == "bad" for seq in seqs):
            raise torch.OutOfMemoryError("CPU out of memory (test)")
        return decode(seqs)

    monkeypatch.setattr(engine.runner, "decode", failing_with_bad)
    tokens, errors = run_collecting(engine)
    assert list(errors) == ["bad"] and len(tokens["bad"]) == 1  # its prefill token, then the failure
    assert_bystanders_greedy(tokens, ps, reference_greedy)


def test_a_fault_every_sequence_hits_is_the_engines(hf_model, monkeypatch):
    """When every sequence fails alone too, the fault is not one request's: step raises, the loop
    ends, and the replica's health check has Serve replace it."""
    engine = make_engine(hf_model)
    add_bystanders(engine, hf_model[1], n=3)

    def broken(seqs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "prefill", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()


def test_seed_out_of_range_names_seed(hf_model):
    engine = make_engine(hf_model)
    with pytest.raises(RequestRejected) as caught:
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=2, temperature=1.0, seed=2**64))
    assert caught.value.param == "seed"
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=2, temperature=1.0, seed=2**63 + 5))  # n > 1 adds i


def test_prompt_logprobs_in_chunks_match_one_forward(hf_model, monkeypatch):
    """Scored through the paged prefill a few positions at a time (bounded memory): the same values
    as one plain forward of the whole prompt, and the continuation is still greedy-correct."""
    model, tokenizer = hf_model
    vocab = model.config.vocab_size
    monkeypatch.setattr(engine_module, "PROMPT_SCORING_ELEMENTS", 7 * vocab)  # 7 positions a chunk
    engine = make_engine(hf_model)
    prompt = prompts(tokenizer, 1, seed=5)[0] * 2  # > 7 tokens: several chunks
    engine.add_request("scored", prompt, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2))
    outs = []
    while engine.has_work():
        outs += engine.step()
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    scores = outs[0].prompt_logprobs
    assert len(scores) == len(prompt) and scores[0].chosen.logprob is None
    for p in range(1, len(prompt)):
        assert scores[p].chosen.logprob == pytest.approx(float(expected[p - 1, prompt[p]]), abs=1e-4)
        assert [t.token_id for t in scores[p].top] == expected[p - 1].topk(2).indices.tolist()
    assert [o.token_ids[0] for o in outs] == [int(expected[-1].argmax())] + [o.token_ids[0] for o in outs[1:]]


def test_same_request_id_never_shares_a_stream(hf_model, reference_greedy):
    """The caller's id (a client's x-request-id) is for logs: eight requests that bring the same one
    each get exactly their own greedy output."""
    engine = AsyncEngine(make_engine(hf_model))
    ps = prompts(hf_model[1], 8, seed=7)

    async def one(prompt):
        tokens = []
        async for out in engine.generate("abc", prompt, greedy(10)):
            assert out.request_id == "abc"
            tokens += out.token_ids
        return tokens

    async def run():
        return await asyncio.gather(*(one(p) for p in ps))

    for prompt, tokens in zip(ps, asyncio.run(run())):
        assert tokens == reference_greedy(prompt, 10)


def test_guided_grammar_compiles_off_the_engine_thread(hf_model, monkeypatch):
    """A slow schema must not stall every sequence: the replica compiles it in the compiler's pool
    before the request reaches the engine thread, which only builds a matcher from the result."""
    import threading

    from app.engine.guided import GuidedCompiler
    from app.engine.sampling_params import GuidedDecoding

    threads = []
    compile_ = GuidedCompiler.compile

    def spy(self, spec):
        threads.append(threading.current_thread().name)
        return compile_(self, spec)

    monkeypatch.setattr(GuidedCompiler, "compile", spy)
    engine = AsyncEngine(make_engine(hf_model))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}

    async def run():
        text = ""
        params = SamplingParams(max_tokens=24, temperature=0.0, guided=GuidedDecoding(schema, param="response_format"))
        async for out in engine.generate("g", [1, 2, 3], params):
            text += out.text
        return text

    text = asyncio.run(run())
    assert threads and "conduit-engine" not in threads, threads
    assert text.startswith("{")
