"""Speculative decoding (issue 20) in the engine, on a copy-heavy workload ("fix the typo in this
~300-token code snippet": the answer repeats the prompt). Every figure is the engine's own `step()` loop,
plain and speculative side by side in the same run, greedy, outputs compared token for token.

1. One stream: plain against n-gram speculation (the default `engine.speculative` settings): tok/s and
   acceptance.
2. `--streams` concurrent streams, the same two (speculation steps aside at `disable_by_batch_size`).
3. Draft model, one stream: the target as its own draft (always agrees) and a differently seeded demo
   model (disagrees): tok/s and acceptance.
4. `--tuning`: how to set the defaults: replay the greedy outputs through the n-gram proposer for several
   (k, lookup) settings, and what a verify forward costs against a decode forward at batch 1..32.

    .venv/bin/python bench/spec_decode.py [--model DIR] [--max-tokens 200] [--streams 32] [--tuning]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from app.config import PROJECT_ROOT, EngineConfig
from app.demo_model import build_demo_model
from app.engine.block_manager import BlockManager
from app.engine.engine import LLMEngine
from app.engine.model_runner import ModelRunner
from app.engine.sampling_params import SamplingParams
from app.engine.spec.draft import DraftSequence
from app.engine.spec.ngram import NgramIndex
from app.engine.spec.stats import SpecDecodeStats
from app.engine.spec.verify import greedy_verdict

BLOCK_SIZE, NUM_BLOCKS = 16, 2048
SETTINGS = [(k, lo, hi) for k in (2, 4, 6, 8) for lo, hi in ((1, 3), (2, 4), (3, 5))]


# the workload ---------------------------------------------------------------------------------------
def typo_prompts(tokenizer, n: int, snippet_tokens: int = 300, seed: int = 0) -> list[list[int]]:
    """n prompts asking to fix one typo in a ~snippet_tokens piece of the standard library's code."""
    rng = random.Random(seed)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    prompts = []
    while len(prompts) < n:
        lines = rng.choice(files).read_text(encoding="utf-8", errors="ignore").splitlines()
        start = rng.randrange(max(1, len(lines) - 60))
        code = ""
        for line in lines[start:]:
            if len(tokenizer.encode(code + line + "\n")) > snippet_tokens:
                break
            code += line + "\n"
        words = [w for w in code.split() if len(w) > 4 and w.isidentifier()]
        if len(tokenizer.encode(code)) < snippet_tokens // 2 or not words:
            continue
        word = rng.choice(words)
        i = rng.randrange(1, len(word) - 1)
        code = code.replace(word, word[:i] + word[i + 1] + word[i] + word[i + 2 :], 1)  # swap two letters
        prompts.append(tokenizer.encode(f"Fix the typo in this code:\n```python\n{code}```\nFixed:\n```python\n"))
    return prompts


# 1-3. the engine, plain or speculative ----------------------------------------------------------------
def engine_run(model, tokenizer, prompts: list[list[int]], max_tokens: int,
               speculative: dict | None) -> tuple[list[list[int]], float, SpecDecodeStats | None]:
    """(each prompt's greedy output, output tok/s, speculation's counters) from one engine's step loop."""
    config = EngineConfig(max_num_seqs=max(32, len(prompts)), max_model_len=1024, num_kv_blocks=NUM_BLOCKS,
                          speculative=speculative)
    engine = LLMEngine(model, tokenizer, config.resolved(1024))
    # first-call costs (dynamo recompiling for new shapes) out of the timing; a repeating prompt, so that
    # the n-gram proposer drafts and the verify forward's shapes are compiled too
    warm = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine.add_request("warm-up", prompts[-1][:64] + prompts[-1][:64], warm)
    while engine.has_work():
        engine.step()
    if engine.spec_stats is not None:
        engine.spec_stats = SpecDecodeStats()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outputs = {str(i): [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
    elapsed = time.perf_counter() - start
    return [outputs[str(i)] for i in range(len(prompts))], sum(map(len, outputs.values())) / elapsed, \
        engine.stats().spec


def side_by_side(label: str, plain: tuple, spec: tuple) -> None:
    (plain_out, plain_tps, _), (spec_out, spec_tps, stats) = plain, spec
    print(f"   {label}: plain {plain_tps:.1f} tok/s, speculative {spec_tps:.1f} tok/s = {spec_tps / plain_tps:.2f}x; "
          f"acceptance {stats.acceptance_rate:.2f} ({stats.num_accepted_tokens}/{stats.num_draft_tokens} draft "
          f"tokens, {stats.mean_acceptance_length:.2f} tokens per draft, {stats.num_drafts} drafts); "
          f"outputs equal: {plain_out == spec_out}")


# 2. replay ---------------------------------------------------------------------------------------------
def replay(prompt: list[int], output: list[int], k: int, lo: int, hi: int, stats: SpecDecodeStats) -> int:
    """Walk `output` as the speculative loop would; returns the verify steps it took."""
    index, done, steps = NgramIndex(lo, hi), 1, 0  # the first token comes from the prefill
    while done < len(output):
        index.sync(prompt, output[:done])
        budget = min(k, len(output) - done - 1)
        draft = index.propose(budget) if budget > 0 else []
        verdict = greedy_verdict(draft, output[done : done + len(draft) + 1])
        if draft:
            stats.record(len(draft), verdict.num_accepted)
        done += len(verdict.tokens)
        steps += 1
    return steps


# 4. verify against decode forward cost -----------------------------------------------------------------
@torch.inference_mode()
def forward_ms(runner: ModelRunner, batch: int, new_tokens: int, context: int = 300, repeat: int = 7) -> float:
    """Median ms of one forward computing `new_tokens` per sequence over `context` cached tokens each."""
    blocks = BlockManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=False)
    seqs = []
    for i in range(batch):
        seq = DraftSequence(str(i), [(7 * i + j) % 2000 + 10 for j in range(context + new_tokens)])
        blocks.allocate(seq)
        seqs.append(seq)
    times = []
    for _ in range(repeat):
        for seq in seqs:
            seq.num_cached = context
        start = time.perf_counter()
        runner.prefill(seqs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a model directory (default: the demo model)")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tuning", action="store_true", help="also the replay table and forward costs (section 4)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    path = args.model or build_demo_model(PROJECT_ROOT / ".cache" / "demo-model")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    prompts = typo_prompts(tokenizer, args.streams)
    print(f"model {path}; prompts ~{statistics.mean(map(len, prompts)):.0f} tokens; max_tokens {args.max_tokens}")
    ngram = {"method": "ngram"}

    print("\n1. one stream, n-gram (defaults):")
    single = engine_run(model, tokenizer, prompts[:1], args.max_tokens, None)
    side_by_side("1 stream", single, engine_run(model, tokenizer, prompts[:1], args.max_tokens, ngram))
    copied = _copied(prompts[0], single[0][0])
    print(f"   {copied:.0%} of the output's 4-grams occur in the prompt (how copy-like the model is)")

    print(f"\n2. {args.streams} streams, n-gram (defaults):")
    batch = engine_run(model, tokenizer, prompts, args.max_tokens, None)
    side_by_side(f"{args.streams} streams", batch, engine_run(model, tokenizer, prompts, args.max_tokens, ngram))

    print("\n3. one stream, draft model:")
    other = build_demo_model(PROJECT_ROOT / ".cache" / "demo-model-seed1", seed=1)
    for label, draft in (("target as its own draft", path), ("a differently seeded demo model", other)):
        spec = {"method": "draft_model", "draft_model": str(draft)}
        side_by_side(label, single, engine_run(model, tokenizer, prompts[:1], args.max_tokens, spec))
    if args.tuning:
        tuning(model, prompts, batch[0])


def tuning(model, prompts: list[list[int]], outputs: list[list[int]]) -> None:
    print(f"\n4. replay of the {len(outputs)} greedy outputs (n-gram proposer):")
    print("   k  lookup  drafts  draft tok  accepted  rate   tokens/step")
    best = None
    for k, lo, hi in SETTINGS:
        stats, steps = SpecDecodeStats(), 0
        for prompt, output in zip(prompts, outputs):
            steps += replay(prompt, output, k, lo, hi, stats)
        per_step = sum(len(o) - 1 for o in outputs) / steps
        print(f"   {k}  {lo}-{hi}    {stats.num_drafts:6d}  {stats.num_draft_tokens:9d}  {stats.num_accepted_tokens:8d}"
              f"  {stats.acceptance_rate:.2f}   {per_step:.2f}")
        if best is None or per_step > best[0]:
            best = (per_step, k)
    per_step, k = best
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE)
    print(f"   forward cost, verify (k={k}: {k + 1} tokens/seq) against decode (1 token/seq), ~300-token contexts:")
    print("   batch  decode ms  verify ms  ratio  projected speedup at the measured tokens/step")
    for batch in (1, 2, 4, 8, 16, 32):
        decode, verify = forward_ms(runner, batch, 1), forward_ms(runner, batch, k + 1)
        print(f"   {batch:5d}  {decode:9.1f}  {verify:9.1f}  {verify / decode:5.2f}  {per_step * decode / verify:.2f}x")


def _copied(prompt: list[int], output: list[int]) -> float:
    grams = {tuple(prompt[i : i + 4]) for i in range(len(prompt) - 3)}
    outs = [tuple(output[i : i + 4]) for i in range(len(output) - 3)]
    return sum(g in grams for g in outs) / max(1, len(outs))


if __name__ == "__main__":
    main()
