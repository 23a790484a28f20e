"""Guided decoding's guards: the caps a schema must fit (refused with a message naming the cap and
the field), the compile's time limit and bounded pool, and matchers built from a grammar compiled
off the engine thread behaving as the engine's own."""

import asyncio
import threading

import pytest

from app.api.errors import ConduitError
from app.api.protocol import GenerateRequest, ToolSpec
from app.api.tools import constrain
from app.api.wire.openai_extras import check
from app.engine.guided import COMPILE_WORKERS, CompilerBusy, CompileTimeout, GuidedCompiler, bounded, compile_with_limit
from app.engine.sampling_params import GuidedDecoding, SamplingParams
from app.engine.schema_limits import MAX_SCHEMA_BYTES, SchemaError, check_schema, pattern_repeats
from tests.unit.test_logprobs_guided import PERSON

# xgrammar takes a few hundred ms on this (optional properties cost it about quadratic time)
SLOW = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(128)}}


def nested(levels: int) -> dict:
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.fixture
def compiler(hf_model):
    model, tokenizer = hf_model
    compiler = GuidedCompiler(tokenizer, model.config.vocab_size, [tokenizer.eos_token_id])
    yield compiler
    compiler.pool.shutdown(wait=True)  # a timed-out compile runs on: let it end inside its test


@pytest.mark.parametrize("schema, message", [
    (nested(16), "nests deeper than 32 levels"),
    ({"enum": ["x" * 1000] * 70}, f"bytes; at most {MAX_SCHEMA_BYTES}"),
    ({"type": "object", "properties": {f"p{i}": {} for i in range(129)}}, "/properties has 129 properties; at most 128"),
    ({"anyOf": [{"const": i} for i in range(129)]}, "/anyOf has 129 branches; at most 128"),
    ({"type": "string", "pattern": "^([a-z]{1,16}){1,16}$"}, "/pattern nests repetitions whose bounds multiply to 256"),
    ({"type": "string", "pattern": "^([a-z]?){1,64}$"}, "multiply to 64; at most 32"),
    ({"type": "string", "pattern": "^[a-z]{2000,4000}$"}, "repeat 4000 times in all"),
    ({"properties": {f"p{i}": {"type": "string", "pattern": "^.{0,256}$"} for i in range(5)}}, "repeat 1280 times"),
    ({"patternProperties": {"^(a{1,9}){1,9}$": {}}}, "/patternProperties nests repetitions"),
    ({"type": "string", "pattern": "|".join(["word"] * 1000)}, "patterns have 4999 characters in all; at most 4096"),
    ({"type": "string", "pattern": "(unclosed"}, "/pattern is not a valid regular expression"),
    ({"type": "strng"}, "invalid JSON schema: \"strng\" is not valid"),
])
def test_schema_over_a_cap_is_refused_naming_it(schema, message):
    with pytest.raises(SchemaError, match=message.replace("?", r"\?").replace("(", r"\(")):
        check_schema(schema)


def test_schemas_within_the_caps_pass():
    check_schema(nested(15))
    check_schema(PERSON)
    check_schema({"type": "string", "pattern": r"^((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)$"})
    check_schema({"type": "string", "pattern": "^([a-z]?){1,32}$"})


@pytest.mark.parametrize("pattern, repeats", [
    ("a{1,5}", 5), ("(a{1,5}){3}", 18), ("a{3,}", 4), ("a{7}", 7), (r"\{1,500\}", 0), ("[{1,500}]", 0),
    ("(?:ab)*?c", 2), (r"^(\+\d{1,3})?\d{10}$", 14),
])
def test_pattern_repeats_counts_expanded_repetitions(pattern, repeats):
    assert pattern_repeats(pattern) == repeats


def test_edge_refusal_is_a_400_naming_the_field():
    with pytest.raises(ConduitError) as caught:
        check(nested(40), "response_format.json_schema.schema")
    assert caught.value.status == 400 and caught.value.param == "response_format.json_schema.schema"
    assert "response_format.json_schema.schema: the JSON schema nests deeper than 32" in caught.value.message


def test_forced_call_over_all_tools_is_capped():
    tools = [ToolSpec(f"t{i}", None, {"type": "object"}) for i in range(129)]
    req = GenerateRequest(request_id="r", model="m", sampling=SamplingParams(), prompt="x", tools=tools,
                          tool_choice="required")
    with pytest.raises(ConduitError, match="anyOf has 129 branches") as caught:
        constrain(req)
    assert caught.value.param == "tools"


def test_compile_over_the_time_limit_is_refused_and_its_late_result_kept(compiler):
    spec = GuidedDecoding(SLOW)
    with pytest.raises(CompileTimeout, match="longer than 0.02 s"):
        asyncio.run(compile_with_limit(compiler, spec, timeout_s=0.02))
    with pytest.raises(CompileTimeout):  # still compiling: refused at once, not compiled twice
        asyncio.run(compile_with_limit(compiler, spec, timeout_s=60))
    compiler.pool.shutdown(wait=True)  # the timed-out compile ran on to its end...
    assert compiler.cached(spec) is not None  # ...and was kept: a retry costs nothing
    assert not compiler.is_too_slow(spec)


def test_busy_pool_refuses_instead_of_queueing_for_ever(compiler):
    release = threading.Event()
    for _ in range(COMPILE_WORKERS):
        compiler.pool.submit(release.wait)
    try:
        with pytest.raises(CompilerBusy):
            asyncio.run(compile_with_limit(compiler, GuidedDecoding(PERSON), timeout_s=0.05))
    finally:
        release.set()
    assert asyncio.run(compile_with_limit(compiler, GuidedDecoding(PERSON), timeout_s=60)) is not None


def test_xgrammar_refusal_is_a_schema_error(compiler):
    with pytest.raises(SchemaError, match="invalid JSON schema"):
        asyncio.run(compile_with_limit(compiler, GuidedDecoding({"type": "array", "minItems": 5, "maxItems": 2})))


def test_precompiled_matcher_behaves_as_the_engine_own(compiler, hf_model):
    tokenizer = hf_model[1]
    spec = GuidedDecoding(PERSON)
    precompiled = compiler.matcher_from(asyncio.run(compile_with_limit(compiler, spec)))
    fresh = GuidedCompiler(tokenizer, compiler.vocab_size, [tokenizer.eos_token_id]).matcher(spec)
    text = '{"name": "Ann", "age": 7, "tags": ["a"], "score": 1.5}'
    for token in [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]:
        masks = []
        for m in (precompiled, fresh):
            m.matcher.fill_next_token_bitmask(m.bitmask)
            masks.append(m.bitmask.clone())
        assert masks[0].equal(masks[1])
        precompiled.advance(token)
        fresh.advance(token)
    assert precompiled.done and fresh.done


def test_lower_bounds_beyond_the_defaults_compile(compiler):
    schema = {"type": "array", "items": {"type": "string", "minLength": 300}, "minItems": 70}
    assert bounded(schema)["maxItems"] == 70 and bounded(schema)["items"]["maxLength"] == 300
    compiler.compile(GuidedDecoding(schema))
