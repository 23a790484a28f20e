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

_ANY_VALUE = {"anyOf": [
    {"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
    {"type": "array", "items": {"$ref": "#/$defs/value"}},
    {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}},
]}
# OpenAI's json_object: any JSON object (spelled out, so that the bounds below apply inside it)
ANY_OBJECT = {"$defs": {"value": _ANY_VALUE}, "type": "object", "additionalProperties": {"$ref": "#/$defs/value"}}
# Bounds added where a schema sets none, so that a model stuck repeating itself inside a string,
# a number or an array (the random demo model does) still closes its JSON in a bounded number of
# tokens. Output stays valid for the schema as given: these only narrow it.
MAX_STRING_CHARS = 256
MAX_ARRAY_ITEMS = 64
MAX_OPEN_PROPERTIES = 32  # properties of an object that allows ones its schema does not list
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
        out.setdefault("maxLength", MAX_STRING_CHARS)
    elif kind in ("integer", "number") and free:
        limit = MAX_INTEGER if kind == "integer" else MAX_NUMBER
        if not ({"minimum", "exclusiveMinimum"} & schema.keys()):
            out["minimum"] = -limit
        if not ({"maximum", "exclusiveMaximum"} & schema.keys()):
            out["maximum"] = limit
    elif kind == "array" and "maxItems" not in schema:
        out["maxItems"] = MAX_ARRAY_ITEMS
    elif kind == "object" and schema.get("additionalProperties") not in (None, False):
        out.setdefault("maxProperties", MAX_OPEN_PROPERTIES)
        out.setdefault("propertyNames", bounded({"type": "string"}))
    return out


class GuidedCompiler:
    """xgrammar's compiler over this model's vocabulary, with the compiled schemas cached (xgrammar's
    own cache is off: with it on, long `{0,256}` repeats in a pattern fail an internal check)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], cache_size: int = 64):
        try:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        except Exception as e:  # a ValueError refuses the request; anything else would end the engine loop
            raise ValueError(f"guided decoding is not available for this model's tokenizer: {e}") from None
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size
        # Compact JSON never holds a raw control character, but xgrammar's bounded-string rule
        # (maxLength) lets them through: such tokens are masked for every guided sequence.
        self.control_tokens = torch.zeros(vocab_size, dtype=torch.bool)
        self.control_tokens[[i for i, t in enumerate(info.decoded_vocab) if any(b < 0x20 for b in t)]] = True
        self.cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self.cache_size = cache_size

    def matcher(self, spec: GuidedDecoding) -> GuidedMatcher:
        key = json.dumps(spec.json_schema)
        compiled = self.cache.pop(key, None) or self._compile(spec.json_schema)
        self.cache[key] = compiled  # most recently used last
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return GuidedMatcher(compiled, self.vocab_size, self.control_tokens)

    def _compile(self, json_schema: dict | None) -> xgr.CompiledGrammar:
        # compact JSON (no free whitespace): a weak model could otherwise emit blanks for ever.
        # strict: no properties beyond the schema's; json_object (no schema) allows any.
        try:
            return self.compiler.compile_json_schema(json.dumps(bounded(json_schema or ANY_OBJECT)),
                                                     any_whitespace=False)
        except RuntimeError as e:
            raise ValueError(f"invalid JSON schema: {str(e).strip().splitlines()[-1]}") from None


class GuidedMatcher:
    """One sequence's position in its grammar. Stop tokens are allowed only where the grammar
    is complete, and accepting one terminates it."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int, forbidden: torch.Tensor):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.forbidden = forbidden  # [vocab] bool: never allowed, whatever the grammar says

    def mask(self, logits: torch.Tensor) -> None:
        """logits: [1, vocab], edited in place: disallowed tokens get -inf."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device))
        logits[:, : self.forbidden.shape[0]].masked_fill_(self.forbidden.to(logits.device), float("-inf"))

    def advance(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise RuntimeError(f"guided decoding: token {token_id} is outside the grammar")

    @property
    def done(self) -> bool:
        """The grammar accepted a stop token: nothing else may follow."""
        return self.matcher.is_terminated()
