"""Guided decoding: output constrained to JSON (any object, or valid for a JSON Schema) with
xgrammar. A `GuidedCompiler` is built once per replica from the tokenizer; each constrained
sequence gets a `GuidedMatcher` that masks the logits before sampling and advances after it.
Sequences without a spec never touch this module."""

from __future__ import annotations

import json
from collections import OrderedDict

import torch
import xgrammar as xgr

from app.engine.sampling_params import GuidedDecoding

ANY_OBJECT = {"type": "object"}  # OpenAI's json_object: any JSON object
# Bounds added where a schema sets none, so that a model stuck repeating itself inside a string,
# a number or an array (the random demo model does) still closes its JSON in a bounded number of
# tokens. Output stays valid for the schema as given: these only narrow it.
MAX_STRING_CHARS = 256
MAX_ARRAY_ITEMS = 64
MAX_INTEGER = 2**53 - 1  # JSON's safe-integer range
MAX_NUMBER = 1e15


def check_schema(schema: dict) -> None:
    """Raise ValueError when `schema` is not a JSON Schema that guided decoding can compile."""
    from jsonschema import SchemaError, validators

    try:
        validators.validator_for(schema).check_schema(schema)
        xgr.Grammar.from_json_schema(json.dumps(bounded(schema)), any_whitespace=False)
    except (SchemaError, RuntimeError, ValueError, TypeError) as e:
        message = e.message if isinstance(e, SchemaError) else str(e).strip().splitlines()[-1]
        raise ValueError(f"invalid JSON schema: {message}") from None


def bounded(schema):
    """A copy of `schema` with the bounds above added to every string, integer, number and array
    subschema that lacks its own."""
    if isinstance(schema, list):
        return [bounded(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: bounded(value) for key, value in schema.items()}
    kind = schema.get("type")
    free = not ({"enum", "const"} & schema.keys())
    if kind == "string" and free and not ({"pattern", "format"} & schema.keys()):
        # a pattern rather than maxLength: xgrammar's maxLength rule lets raw control characters
        # through, which JSON forbids inside strings
        low, high = out.pop("minLength", 0), out.pop("maxLength", MAX_STRING_CHARS)
        out["pattern"] = f'^[^"\\\\\\x00-\\x1f]{{{low},{high}}}$'
    elif kind in ("integer", "number") and free:
        limit = MAX_INTEGER if kind == "integer" else MAX_NUMBER
        if not ({"minimum", "exclusiveMinimum"} & schema.keys()):
            out["minimum"] = -limit
        if not ({"maximum", "exclusiveMaximum"} & schema.keys()):
            out["maximum"] = limit
    elif kind == "array" and "maxItems" not in schema:
        out["maxItems"] = MAX_ARRAY_ITEMS
    return out


class GuidedCompiler:
    """xgrammar's compiler over this model's vocabulary, with the compiled schemas cached (xgrammar's
    own cache is off: with it on, long `{0,256}` repeats in a pattern fail an internal check)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], cache_size: int = 64):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size
        self.cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self.cache_size = cache_size

    def matcher(self, spec: GuidedDecoding) -> GuidedMatcher:
        key = json.dumps(spec.json_schema)
        compiled = self.cache.pop(key, None) or self._compile(spec.json_schema)
        self.cache[key] = compiled  # most recently used last
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return GuidedMatcher(compiled, self.vocab_size)

    def _compile(self, json_schema: dict | None) -> xgr.CompiledGrammar:
        # compact JSON (no free whitespace): a weak model could otherwise emit blanks for ever.
        # strict: no properties beyond the schema's; json_object (no schema) allows any.
        schema = ANY_OBJECT if json_schema is None else bounded(json_schema)
        try:
            return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                     strict_mode=json_schema is not None)
        except RuntimeError as e:
            raise ValueError(f"invalid JSON schema: {str(e).strip().splitlines()[-1]}") from None


class GuidedMatcher:
    """One sequence's position in its grammar. Stop tokens are allowed only where the grammar
    is complete, and accepting one terminates it."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """logits: [1, vocab], edited in place: disallowed tokens get -inf."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device))

    def advance(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise RuntimeError(f"guided decoding: token {token_id} is outside the grammar")

    @property
    def done(self) -> bool:
        """The grammar accepted a stop token: nothing else may follow."""
        return self.matcher.is_terminated()
