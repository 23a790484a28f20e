"""Paged attention in place (app/engine/attention.py) against the gather it replaced, side by side in
one run: the engine's decode step time and output tok/s at batch 1, 8 and 32, and one prefill of
the batch, with the demo model on this machine's CPU (or CUDA with --device cuda).

"gather" is the former path, kept here only as the baseline: pad the batch, copy every sequence's
K/V rows out of the block pool into it (one index_select per layer and tensor), then SDPA.
"in place" is the engine's runner. Rounds alternate the two, so load from elsewhere falls on both;
figures are medians. Each runner is built and warmed up (compiled) before any timing. Both runners' greedy tokens are checked equal before timing.

    .venv/bin/python bench/attention.py [--batches 1 8 32] [--context 128] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import PROJECT_ROOT, EngineConfig  # noqa: E402
from app.demo_model import build_demo_model  # noqa: E402
from app.engine.engine import LLMEngine  # noqa: E402
from app.engine.model_runner import ModelRunner  # noqa: E402
from app.engine.sampling_params import SamplingParams  # noqa: E402


class GatherRunner:
    """The former runner: left-padded batch, K/V gathered by block table each layer, SDPA over it."""

    def __init__(self, model, num_blocks: int, block_size: int):
        self.model, self.block_size, self.pad_block = model, block_size, num_blocks
        self.device = next(model.parameters()).device
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prefill(self, seqs):
        return self._forward(seqs, [seq.num_tokens - seq.num_cached for seq in seqs], keep=1)[:, -1]

    def decode(self, seqs):
        return self._forward(seqs, [1] * len(seqs), keep=1)[:, -1]

    def _forward(self, seqs, new, keep):
        lengths = torch.tensor([seq.num_tokens for seq in seqs])
        q, kv_len, bs = max(new), int(lengths.max()), self.block_size
        input_ids = torch.zeros((len(seqs), q), dtype=torch.long)
        positions = torch.zeros((len(seqs), q), dtype=torch.long)
        mask = torch.zeros((len(seqs), 1, q, kv_len), dtype=torch.bool)
        mask[:, :, :, 0] = True
        for i, (seq, n) in enumerate(zip(seqs, new)):
            input_ids[i, q - n:] = torch.tensor(seq.token_ids[seq.num_tokens - n:])
            positions[i, q - n:] = torch.arange(seq.num_tokens - n, seq.num_tokens)
            mask[i, 0, q - n:] = torch.arange(kv_len)[None, :] <= positions[i, q - n:, None]
        width = -(-kv_len // bs)
        tables = torch.full((len(seqs), width), self.pad_block, dtype=torch.long)
        for i, seq in enumerate(seqs):
            tables[i, : len(seq.block_ids[:width])] = torch.tensor(seq.block_ids[:width])
        rows = (tables[:, :, None] * bs + torch.arange(bs)).view(len(seqs), -1)[:, :kv_len]
        cols = torch.arange(kv_len)[None, :]
        rows[cols >= lengths[:, None]] = self.pad_block * bs
        new_t = torch.tensor(new)
        write = rows[(cols >= (lengths - new_t)[:, None]) & (cols < lengths[:, None])]
        real = torch.arange(q)[None, :] >= (q - new_t)[:, None]
        self.plan = (write.to(self.device), rows.reshape(-1).to(self.device), len(seqs), kv_len, real.to(self.device))
        out = self.model(input_ids=input_ids.to(self.device), position_ids=positions.to(self.device),
                         attention_mask=mask.to(self.device), **{self.cache_kwarg: self}, use_cache=True, logits_to_keep=keep)
        return out.logits.float()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in self.k:
            _, heads, _, dim = key_states.shape
            shape = ((self.pad_block + 1) * self.block_size, heads, dim)
            self.k[layer_idx] = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
            self.v[layer_idx] = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        k, v = self.k[layer_idx], self.v[layer_idx]
        write, read, batch, kv_len, real = self.plan
        k[write] = key_states.transpose(1, 2)[real]
        v[write] = value_states.transpose(1, 2)[real]
        heads, dim = k.shape[1], k.shape[2]
        return (k.index_select(0, read).view(batch, kv_len, heads, dim).transpose(1, 2),
                v.index_select(0, read).view(batch, kv_len, heads, dim).transpose(1, 2))



def engine_config(batch: int) -> EngineConfig:
    return EngineConfig(max_num_seqs=batch, max_model_len=1024).resolved(1024)


def make_runner(model, kind: str, batch: int):
    config = engine_config(batch)
    return (ModelRunner if kind == "in place" else GatherRunner)(model, config.num_kv_blocks, config.block_size)


def run_once(model, tokenizer, runner, batch: int, context: int, steps: int) -> dict:
    """A fresh engine (empty cache bookkeeping) over `runner`, reused across runs: compilation and
    first-touch page faults fall in the untimed warm-up run."""
    engine = LLMEngine(model, tokenizer, engine_config(batch), runner=runner)
    for i in range(batch):  # different lengths: context - 0..15 tokens
        prompt = [(7 * i + j) % 2900 + 10 for j in range(context - i % 16)]
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    times = []
    while engine.has_work():
        start = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - start)
        for out in outs:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    decode = statistics.median(times[1:])
    return {"prefill_ms": times[0] * 1e3, "step_ms": decode * 1e3, "tok_s": batch / decode, "tokens": tokens}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=128, help="prompt tokens per sequence (up to 15 fewer)")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = build_demo_model(PROJECT_ROOT / ".cache" / "demo-model")
    model = AutoModelForCausalLM.from_pretrained(path).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    kinds = ["gather", "in place"]
    runners = {(b, k): make_runner(model, k, b) for b in args.batches for k in kinds}
    for (batch, _), runner in runners.items():  # warm-up, untimed
        run_once(model, tokenizer, runner, batch, args.context, 2)
    results = {cell: [] for cell in runners}
    for round_ in range(args.rounds):
        for batch in args.batches:
            for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
                results[batch, kind].append(run_once(model, tokenizer, runners[batch, kind], batch, args.context,
                                                     args.steps))
    print(f"\ndemo model, {args.device}, {args.threads} threads, prompts ~{args.context} tokens, {args.steps} decode "
          f"steps, median of {args.rounds} runs per cell\n")
    print(f"{'batch':>5} | {'decode step ms':>22} | {'output tok/s':>22} | {'prefill of the batch ms':>24} | same tokens")
    print(f"{'':>5} | {'gather':>10} {'in place':>11} | {'gather':>10} {'in place':>11} | {'gather':>11} {'in place':>12} |")
    for batch in args.batches:
        old, new = results[batch, "gather"], results[batch, "in place"]

        def med(runs, key):
            return statistics.median(r[key] for r in runs)

        same = all(a["tokens"] == b["tokens"] for a, b in zip(old, new))
        print(f"{batch:>5} | {med(old, 'step_ms'):>10.2f} {med(new, 'step_ms'):>11.2f} | "
              f"{med(old, 'tok_s'):>10.0f} {med(new, 'tok_s'):>11.0f} | "
              f"{med(old, 'prefill_ms'):>11.1f} {med(new, 'prefill_ms'):>12.1f} | {same}")


if __name__ == "__main__":
    main()
