"""Speculative decoding (issue 20): what n-gram drafts would buy on a copy-heavy workload ("fix the typo
in this ~300-token code snippet": the answer repeats the prompt), measured before the engine integrates
it (docs/speculative-decoding.md, phase 2).

1. Plain greedy decoding with the engine as it is today, 1 stream and 32 streams: output tok/s, and
   the outputs themselves.
2. Replay: walk each greedy output as the speculative loop would (draft k tokens with the n-gram
   proposer from prompt + output so far, keep the prefix the target agrees with plus its own token) and
   count drafts and accepted tokens: the acceptance the engine will see, for several (k, lookup) settings.
3. One stream decoded speculatively on the engine's ModelRunner (propose, verify k+1 positions in one
   forward, roll back), against plain one-token decode steps on the same runner, in the same run.
4. What a verify forward costs against a decode forward at batch 1..32: where speculation stops paying
   (sets disable_by_batch_size), given the measured tokens per verified step.

    .venv/bin/python bench/spec_decode.py [--model DIR] [--max-tokens 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from app.config import PROJECT_ROOT, EngineConfig, SpeculativeConfig
from app.demo_model import build_demo_model
from app.engine.block_manager import BlockManager
from app.engine.engine import LLMEngine
from app.engine.model_runner import ModelRunner
from app.engine.sampling_params import SamplingParams
from app.engine.spec.draft import DraftSequence
from app.engine.spec.ngram import NgramIndex, NgramProposer
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


# 1. plain decoding with today's engine ------------------------------------------------------------------
def plain_engine(model, tokenizer, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    config = EngineConfig(max_num_seqs=max(32, len(prompts)), max_model_len=1024, num_kv_blocks=NUM_BLOCKS)
    engine = LLMEngine(model, tokenizer, config.resolved(1024))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outputs = {str(i): [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
    elapsed = time.perf_counter() - start
    return [outputs[str(i)] for i in range(len(prompts))], sum(map(len, outputs.values())) / elapsed


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


# 3. one stream, speculative against plain, on the engine's ModelRunner ---------------------------------------
@torch.inference_mode()
def one_stream(runner: ModelRunner, prompt: list[int], max_tokens: int, k: int | None) -> tuple[list[int], float]:
    """Greedy decode on the runner, speculatively with n-gram drafts of k tokens (None: plainly). (tokens, tok/s)"""
    blocks = BlockManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=False)
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=k or 1))
    cache = DraftSequence("one", prompt)  # the target's tokens fed so far and its block table
    blocks.allocate(cache)
    start = time.perf_counter()
    output = [int(runner.prefill_span(cache, 0, cache.num_tokens)[-1].argmax())]
    cache.num_cached = cache.num_tokens
    while len(output) < max_tokens:
        cache.output_ids = list(output)
        cache.prompt_ids, cache.request_id = prompt, "one"
        draft = proposer.propose([cache], [min(k, max_tokens - len(output) - 1)])[0] if k else []
        cache.output_ids = output + draft
        while len(cache.block_ids) * BLOCK_SIZE < cache.num_tokens:
            blocks.append(cache)
        logits = runner.prefill_span(cache, len(prompt) + len(output) - 1, cache.num_tokens)
        output += greedy_verdict(draft, logits.argmax(dim=-1).tolist()).tokens
        cache.num_cached = len(prompt) + len(output) - 1
    elapsed = time.perf_counter() - start
    blocks.deallocate(cache)
    return output[:max_tokens], len(output) / elapsed


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
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    path = args.model or build_demo_model(PROJECT_ROOT / ".cache" / "demo-model")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    prompts = typo_prompts(tokenizer, args.streams)
    print(f"model {path}; prompts ~{statistics.mean(map(len, prompts)):.0f} tokens; "
          f"max_tokens {args.max_tokens}")

    [single], single_tps = plain_engine(model, tokenizer, prompts[:1], args.max_tokens)
    outputs, batch_tps = plain_engine(model, tokenizer, prompts, args.max_tokens)
    print(f"\n1. plain engine: 1 stream {single_tps:.0f} tok/s; {args.streams} streams {batch_tps:.0f} tok/s")
    copied = sum(_copied(p, o) for p, o in zip(prompts, outputs)) / len(outputs)
    print(f"   greedy outputs: {copied:.0%} of output 4-grams occur in the prompt (how copy-like the model is)")

    print(f"\n2. replay of the {args.streams} greedy outputs (n-gram proposer):")
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
            best = (per_step, k, lo, hi, stats)
    per_step, k, lo, hi, stats = best
    print(f"   best: k={k} lookup {lo}-{hi}: {per_step:.2f} tokens per step; accepted per position "
          f"{stats.accepted_per_position}")

    runner = ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE)
    one_stream(runner, prompts[1], 20, k)  # warm up both paths
    one_stream(runner, prompts[1], 20, None)
    plain_tokens, plain_tps = one_stream(runner, prompts[0], args.max_tokens, None)
    spec_tokens, spec_tps = one_stream(runner, prompts[0], args.max_tokens, k)
    print(f"\n3. one stream on the ModelRunner: plain {plain_tps:.0f} tok/s, speculative (k={k}) {spec_tps:.0f} tok/s "
          f"= {spec_tps / plain_tps:.2f}x; outputs equal: {plain_tokens == spec_tokens == single}")

    print(f"\n4. forward cost, verify (k={k}: {k + 1} tokens/seq) against decode (1 token/seq), ~300-token contexts:")
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
