"""Log-probs against a direct forward pass, and guided decoding (JSON valid for its schema) in the
engine, batch-mixed with unconstrained requests that must stay equal to `generate`."""

import json

import jsonschema
import pytest
import torch

from app.engine.guided import bounded
from app.engine.logprobs import TokenNames, token_logprobs
from app.engine.sampling_params import GuidedDecoding, SamplingParams
from app.engine.schema_limits import check_schema
from tests.unit.test_engine import make_engine, prompts, run_all

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "score"],
}


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_token_logprobs_math():
    names = TokenNames(type("T", (), {"decode": staticmethod(lambda ids: f"<{ids[0]}>")})())
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    rows = token_logprobs(logits, [0, 2], [2, 0], names)
    expected = torch.log_softmax(logits, dim=-1)
    assert rows[0].chosen.logprob == pytest.approx(float(expected[0, 0]))
    assert [t.token_id for t in rows[0].top] == [2, 1] and rows[0].top[0].token == "<2>"
    assert rows[0].top[1].logprob == pytest.approx(float(expected[0, 1]))
    assert rows[1].top == [] and rows[1].chosen.logprob == pytest.approx(float(expected[1, 2]))
    assert len(token_logprobs(logits, [0, 2], [9, 0], names)[0].top) == 3  # capped at the vocabulary


def test_output_and_prompt_logprobs_match_a_forward_pass(hf_model):
    model, tokenizer = hf_model
    engine = make_engine(hf_model)
    prompt = prompts(tokenizer, 1, seed=3)[0]
    engine.add_request("lp", prompt, SamplingParams(max_tokens=12, temperature=0.8, seed=1, logprobs=3,
                                                    prompt_logprobs=2, repetition_penalty=1.3))
    engine.add_request("plain", prompts(tokenizer, 1, seed=4)[0], SamplingParams(max_tokens=12, temperature=0.0))
    outs = {}
    while engine.has_work():
        for out in engine.step():
            outs[out.request_id] = out if out.request_id not in outs else outs[out.request_id].merge(out)
    assert outs["plain"].logprobs is None and outs["plain"].prompt_logprobs is None
    out = outs["lp"]
    ref = forward_logprobs(model, prompt + out.token_ids)
    n = len(prompt)
    assert len(out.logprobs) == len(out.token_ids) == 12
    for j, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[n - 1 + j]  # raw log-softmax: penalties and temperature do not change it
        assert lp.chosen.token_id == token and lp.chosen.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert [t.token_id for t in lp.top] == row.topk(3).indices.tolist()
    first = out.prompt_logprobs[0].chosen
    assert (first.token_id, first.logprob) == (prompt[0], None) and len(out.prompt_logprobs) == n
    for j in range(1, n):
        entry = out.prompt_logprobs[j]
        assert entry.chosen.token_id == prompt[j]
        assert entry.chosen.logprob == pytest.approx(float(ref[j - 1, prompt[j]]), abs=1e-4)
        assert len(entry.top) == 2


def test_guided_json_valid_and_unconstrained_rows_unchanged(hf_model, reference_greedy):
    _, tokenizer = hf_model
    engine = make_engine(hf_model)
    ps = prompts(tokenizer, 8, seed=5)
    for i, p in enumerate(ps):
        if i % 2:
            engine.add_request(str(i), p, SamplingParams(max_tokens=20, temperature=0.0, min_tokens=20))
        else:
            temperature = 0.0 if i == 0 else 1.0
            guided = GuidedDecoding(PERSON if i % 4 == 0 else None)
            engine.add_request(str(i), p, SamplingParams(max_tokens=400, temperature=temperature, seed=i,
                                                         guided=guided))
    outputs = run_all(engine)
    for i, p in enumerate(ps):
        if i % 2:
            assert outputs[str(i)] == reference_greedy(p, 20)
            continue
        value = json.loads(run_all.text[str(i)])
        assert isinstance(value, dict)
        if i % 4 == 0:
            jsonschema.validate(value, PERSON)
    assert engine.stats().kv_blocks_used == 0


def test_bounded_only_narrows():
    schema = {"type": "object", "properties": {"s": {"type": "string"}, "e": {"type": "string", "enum": ["x"]},
                                               "n": {"type": "integer", "minimum": 3}, "l": {"type": "array"}}}
    props = bounded(schema)["properties"]
    assert props["s"]["maxLength"] == 256 and "maxLength" not in props["e"]
    assert props["n"]["minimum"] == 3 and props["n"]["maximum"] == 2**53 - 1
    assert props["l"]["maxItems"] == 64 and "maxItems" not in schema["properties"]["l"]


@pytest.mark.parametrize("schema", [{"type": "strin"}, {"type": "object", "properties": {"a": {"minimum": "x"}}}])
def test_bad_schema_is_refused(schema):
    with pytest.raises(ValueError, match="invalid JSON schema"):
        check_schema(schema)
