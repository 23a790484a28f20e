"""Caps on a JSON Schema sent for guided decoding, checked where the request arrives, before
anything compiles it. xgrammar's compile time grows much faster than a schema's size for a few
shapes (measured in docs/guided-decoding.md): optional properties and anyOf branches (about
quadratic), and counted repetitions in a `pattern` (`{m,n}`: cubic in n; nested ones explode). The
caps bound those; the compile's time limit (`guided.compile_with_limit`) covers what is left.

Pure Python with no xgrammar or torch, so the ingress can import it; every check is one pass over
the schema (no recursion: the depth cap must hold before anything recurses)."""

from __future__ import annotations

import json
import re

MAX_SCHEMA_BYTES = 64 * 1024  # compact JSON text
MAX_SCHEMA_DEPTH = 32  # nested JSON objects/arrays (a schema level is 2: "properties", then the subschema)
MAX_PROPERTIES = 128  # per object schema
MAX_BRANCHES = 128  # per anyOf / oneOf / allOf
MAX_REPEAT_TOTAL = 1024  # a pattern's counted repetitions, expanded, summed over the whole schema
MAX_NESTED_REPEAT = 32  # product of the bounds of repetitions nested in one another in a pattern
MAX_PATTERN_CHARS = 4096  # all the schema's patterns together (Python's re.compile checks each: ~linear)


class SchemaError(ValueError):
    """The schema cannot be used for guided decoding: the message says why (a 400)."""


def check_schema(schema) -> None:
    """Raise SchemaError when `schema` is over a cap or is not a JSON Schema: milliseconds, so the
    ingress runs it as the request arrives. The metaschema check is jsonschema_rs's (Rust): the
    Python `jsonschema` took seconds on a 58 KB schema (docs/guided-decoding.md)."""
    import jsonschema_rs

    check_limits(schema)
    try:
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as e:
        raise SchemaError(f"invalid JSON schema: {e.message}") from None


def check_limits(schema) -> None:
    """Raise SchemaError naming the first cap `schema` is over. The size first: it bounds the walk."""
    if not isinstance(schema, dict):
        raise SchemaError("the JSON schema must be an object")
    try:
        size = len(json.dumps(schema, separators=(",", ":")))
    except RecursionError:
        raise SchemaError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels") from None
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the JSON schema is {size} bytes; at most {MAX_SCHEMA_BYTES}")
    patterns: list[tuple[str, str]] = []  # (regex, where)
    stack = [(schema, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels (at {path})")
        if isinstance(node, dict):
            patterns += _check_node(node, path)
            stack.extend((value, depth + 1, f"{path}/{key}") for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, depth + 1, f"{path}/{i}") for i, value in enumerate(node))
    chars = sum(len(pattern) for pattern, _ in patterns)
    if chars > MAX_PATTERN_CHARS:
        raise SchemaError(f"the JSON schema's patterns have {chars} characters in all; at most {MAX_PATTERN_CHARS}")
    for pattern, where in patterns:
        _compiles(pattern, where)
    repeats = sum(pattern_repeats(pattern, where) for pattern, where in patterns)
    if repeats > MAX_REPEAT_TOTAL:
        raise SchemaError(f"the JSON schema's patterns repeat {repeats} times in all (counted repetitions, "
                          f"expanded); at most {MAX_REPEAT_TOTAL}")


def _check_node(node: dict, path: str) -> list[tuple[str, str]]:
    """One subschema's own caps; returns its patterns, with where they are."""
    properties = node.get("properties")
    if isinstance(properties, dict) and len(properties) > MAX_PROPERTIES:
        raise SchemaError(f"{path}/properties has {len(properties)} properties; at most {MAX_PROPERTIES}")
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(node.get(key), list) and len(node[key]) > MAX_BRANCHES:
            raise SchemaError(f"{path}/{key} has {len(node[key])} branches; at most {MAX_BRANCHES}")
    patterns = [(node.get("pattern"), f"{path}/pattern")]
    if isinstance(node.get("patternProperties"), dict):  # its keys are regexes too
        patterns += [(key, f"{path}/patternProperties") for key in node["patternProperties"]]
    return [(pattern, where) for pattern, where in patterns if isinstance(pattern, str)]


def _compiles(pattern: str, path: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise SchemaError(f"invalid JSON schema: {path} is not a valid regular expression ({e})") from None


_COUNTED = re.compile(r"\{(\d+)(,(\d*))?\}")


def pattern_repeats(pattern: str, path: str = "pattern") -> int:
    """Expanded size of the counted repetitions in a regex (`a{1,5}` is 5, `(a{1,5}){3}` is 18); raise
    SchemaError when repetitions nested in one another multiply past MAX_NESTED_REPEAT. A scan, not a
    parser: classes and escapes are single atoms; `?`, `*` and `+` count as a bound of 1 (xgrammar
    compiles loops cheaply, but a nullable atom under a counted repetition is as costly as a counted one)."""
    groups: list[list[tuple[int, int]]] = [[]]  # per open group: its atoms as (expanded size, bound product)
    i = 0
    while i < len(pattern):
        c, atoms = pattern[i], groups[-1]
        counted = _COUNTED.match(pattern, i) if c == "{" else None
        if counted or c in "?*+":
            if atoms:
                atoms.append(_repeat(atoms.pop(), _bound(counted), path))
            i = counted.end() if counted else i + 1
            continue
        if c == "(":
            groups.append([])
        elif c == ")" and len(groups) > 1:
            groups.pop()
            groups[-1].append(_group(atoms))
        else:
            atoms.append((0, 1))
            i = _class_end(pattern, i) if c == "[" else i + (c == "\\")
        i += 1
    while len(groups) > 1:  # unbalanced: the regex check refuses it; count it all the same
        inner = groups.pop()
        groups[-1].append(_group(inner))
    return _group(groups[0])[0]


def _bound(counted: re.Match | None) -> int:
    if counted is None:
        return 1
    low, comma, high = counted.groups()
    return int(high) if high else int(low) + (1 if comma else 0)


def _repeat(atom: tuple[int, int], bound: int, path: str) -> tuple[int, int]:
    size, product = atom
    if size and bound * product > MAX_NESTED_REPEAT:
        raise SchemaError(f"{path} nests repetitions whose bounds multiply to {bound * product}; "
                          f"at most {MAX_NESTED_REPEAT}")
    return bound + bound * size, bound * product


def _group(atoms: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(size for size, _ in atoms), max((product for _, product in atoms), default=1)


def _class_end(pattern: str, i: int) -> int:
    """Index of the `]` closing the character class that opens at `i` (the last index if none)."""
    j = i + 1 + (pattern[i + 1 : i + 2] == "^")
    j += pattern[j : j + 1] == "]"  # a leading ] is a member
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return min(j, len(pattern) - 1)
