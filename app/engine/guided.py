"""Guided decoding: output constrained to JSON (any object, or valid for a JSON Schema) with
xgrammar. A `GuidedCompiler` is built once per replica from the tokenizer; each constrained
sequence gets a `GuidedMatcher` that masks the logits before sampling and advances after it.
Sequences without a spec never touch this module.

Compiling a schema can take seconds (docs/guided-decoding.md), so it runs neither on the ingress
loop (which checks only the cheap caps of app/engine/schema_limits.py) nor on the engine thread:
the model replica awaits `compile_with_limit`, which compiles in a small pool under a time limit,
and the engine builds the sequence's matcher from the result (`matcher_from`, cheap)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch
import xgrammar as xgr

from app.engine.sampling_params import GuidedDecoding
from app.engine.schema_limits import SchemaError, check_schema  # noqa: F401 (tgi.py imports it from here)

COMPILE_TIMEOUT_S = 10.0  # a compile that runs longer refuses its request (400)
COMPILE_WORKERS = 2  # compiles at once per replica: the most CPU that runaway compiles can take

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


class CompileTimeout(SchemaError):
    """The schema took longer than the time limit to compile (a 400: it is too complex)."""


class CompilerBusy(RuntimeError):
    """Every compile worker stayed busy for the whole time limit (a 503: retry later)."""


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
    # a schema's own lower bound wins over the default upper one (xgrammar refuses min > max)
    if kind == "string" and free and not ({"pattern", "format"} & schema.keys()):
        out.setdefault("maxLength", max(MAX_STRING_CHARS, _int(schema.get("minLength"))))
    elif kind in ("integer", "number") and free:
        limit = MAX_INTEGER if kind == "integer" else MAX_NUMBER
        if not ({"minimum", "exclusiveMinimum"} & schema.keys()):
            out["minimum"] = -limit
        if not ({"maximum", "exclusiveMaximum"} & schema.keys()):
            out["maximum"] = limit
    elif kind == "array" and "maxItems" not in schema:
        out["maxItems"] = max(MAX_ARRAY_ITEMS, _int(schema.get("minItems")))
    elif kind == "object" and schema.get("additionalProperties") not in (None, False):
        out.setdefault("maxProperties", MAX_OPEN_PROPERTIES)
        out.setdefault("propertyNames", bounded({"type": "string"}))
    return out


def _int(value) -> int:
    return value if isinstance(value, int) else 0


class GuidedCompiler:
    """xgrammar's compiler over this model's vocabulary, with the compiled schemas cached (xgrammar's
    own cache is off: with it on, long `{0,256}` repeats in a pattern fail an internal check).
    Thread-safe: the compile pool and the engine thread share it."""

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
        self.too_slow: OrderedDict[str, None] = OrderedDict()  # timed out and not finished since
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="conduit-guided")

    def cached(self, spec: GuidedDecoding) -> xgr.CompiledGrammar | None:
        with self.lock:
            compiled = self.cache.get(_key(spec))
            if compiled is not None:
                self.cache.move_to_end(_key(spec))  # most recently used last
            return compiled

    def compile(self, spec: GuidedDecoding) -> xgr.CompiledGrammar:
        """The compiled grammar for `spec`, from the cache or compiled now (which may take seconds:
        call it through `compile_with_limit`). Raises SchemaError when xgrammar refuses the schema."""
        compiled = self.cached(spec)
        if compiled is None:
            compiled = self._compile(spec.json_schema)
            with self.lock:
                self.cache[_key(spec)] = compiled
                self.too_slow.pop(_key(spec), None)
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        return compiled

    def matcher_from(self, compiled: xgr.CompiledGrammar) -> GuidedMatcher:
        """A new sequence's matcher over an already compiled grammar (cheap: the engine thread calls it)."""
        return GuidedMatcher(compiled, self.vocab_size, self.control_tokens)

    def matcher(self, spec: GuidedDecoding) -> GuidedMatcher:
        """Compiles on the calling thread: for callers without an event loop (tests, offline use)."""
        return self.matcher_from(self.compile(spec))

    def mark_too_slow(self, spec: GuidedDecoding) -> None:
        with self.lock:
            self.too_slow[_key(spec)] = None
            if len(self.too_slow) > self.cache_size:
                self.too_slow.popitem(last=False)

    def is_too_slow(self, spec: GuidedDecoding) -> bool:
        with self.lock:
            return _key(spec) in self.too_slow

    def _compile(self, json_schema: dict | None) -> xgr.CompiledGrammar:
        # compact JSON (no free whitespace): a weak model could otherwise emit blanks for ever.
        # strict: no properties beyond the schema's; json_object (no schema) allows any.
        try:
            return self.compiler.compile_json_schema(json.dumps(bounded(json_schema or ANY_OBJECT)),
                                                     any_whitespace=False)
        except RuntimeError as e:
            raise SchemaError(f"invalid JSON schema: {str(e).strip().splitlines()[-1]}") from None


async def compile_with_limit(compiler: GuidedCompiler, spec: GuidedDecoding,
                             timeout_s: float = COMPILE_TIMEOUT_S) -> xgr.CompiledGrammar:
    """`compiler.compile(spec)` in the compiler's pool, awaited for at most `timeout_s` once it starts.
    Raises CompileTimeout past that (and at once for a schema that timed out and is still compiling),
    CompilerBusy when no worker was free for `timeout_s`, SchemaError when xgrammar refuses it.

    A thread cannot be stopped: a compile that times out runs on in its worker until xgrammar returns
    (the caps keep that to seconds; docs/guided-decoding.md), then caches its result, so a retry of the
    same schema is served from the cache. Until then that schema is refused at once rather than compiled
    again, and the pool's fixed size bounds how many such compiles can hold a CPU core."""
    compiled = compiler.cached(spec)
    if compiled is not None:
        return compiled
    if compiler.is_too_slow(spec):
        raise CompileTimeout(f"the JSON schema took longer than {timeout_s:g} s to compile; simplify it")
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    def job() -> xgr.CompiledGrammar:
        loop.call_soon_threadsafe(started.set)
        return compiler.compile(spec)

    future = compiler.pool.submit(job)
    try:
        await asyncio.wait_for(started.wait(), timeout_s)
    except TimeoutError:
        future.cancel()  # still queued: it never runs
        raise CompilerBusy("the server is busy compiling other JSON schemas; retry shortly") from None
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
    except TimeoutError:
        compiler.mark_too_slow(spec)
        raise CompileTimeout(f"the JSON schema took longer than {timeout_s:g} s to compile; simplify it") from None


def _key(spec: GuidedDecoding) -> str:
    return json.dumps(spec.json_schema)


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
