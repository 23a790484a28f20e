"""Multi-LoRA in the engine (issue 19), in-process, side by side in one run (docs/lora.md):

1. Output tok/s of `--seqs` greedy sequences decoding together: on the base model (a plain engine), on the
   base model through a LoRA engine (wrapped layers, no adapter in the batch: should cost nothing), and
   spread over `--adapters` adapters (one LoRA engine, `max_adapters_per_replica` = adapters).
2. The time to load an adapter: read and checked from its directory (`load_adapter`), then installed
   into a slot (`LoraSlots.acquire`, the copy into the slot buffers the engine does before a forward).

Adapters are made here with peft on the demo model (rank 8 on q/k/v/o and the MLP, non-zero weights).

    .venv/bin/python bench/lora.py [--seqs 32] [--adapters 8] [--max-tokens 64] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.config import PROJECT_ROOT, EngineConfig, LoraConfig
from app.demo_model import build_demo_model
from app.engine.engine import LLMEngine
from app.engine.lora import load_adapter
from app.engine.sampling_params import SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_path: str, root: Path, count: int) -> list[Path]:
    import peft
    from transformers import AutoModelForCausalLM

    dirs = []
    for i in range(count):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_path)
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        peft.get_peft_model(base, config).save_pretrained(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return dirs


def make_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dogs while python code returns values".split()
    return [tokenizer.encode(" ".join(rng.choice(words) for _ in range(rng.randint(40, 60)))) for _ in range(n)]


def engine_for(model, tokenizer, seqs: int, lora: LoraConfig | None) -> LLMEngine:
    config = EngineConfig(max_num_seqs=seqs, max_model_len=512).resolved(1024)
    return LLMEngine(model, tokenizer, config, lora=lora)


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, adapters: list) -> float:
    """Output tok/s of the prompts decoded together (adapters[i % len] for prompt i; [] = base)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params, lora=adapters[i % len(adapters)] if adapters else None)
    started, tokens = time.perf_counter(), 0
    while engine.has_work():
        tokens += sum(len(out.token_ids) for out in engine.step())
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a served CPU replica has 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = str(build_demo_model(PROJECT_ROOT / ".cache" / "demo-model"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    plain_model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    lora_model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    root = Path(tempfile.mkdtemp(prefix="conduit-bench-lora-"))
    dirs = make_adapters(model_path, root, args.adapters)

    load_ms = []
    adapters = []
    for i, d in enumerate(dirs):
        started = time.perf_counter()
        adapters.append(load_adapter(f"a{i}", str(d), lora_model, 16))
        load_ms.append((time.perf_counter() - started) * 1e3)
    lora_config = LoraConfig(max_adapters_per_replica=args.adapters, max_rank=16)
    plain = engine_for(plain_model, tokenizer, args.seqs, None)
    lora = engine_for(lora_model, tokenizer, args.seqs, lora_config)
    install_ms = []
    for adapter in adapters:  # each into an empty slot, then freed again
        started = time.perf_counter()
        slot = lora.loras.acquire(adapter)
        install_ms.append((time.perf_counter() - started) * 1e3)
        lora.loras.release(slot)
        lora.unload_lora(adapter.name)

    prompts = make_prompts(tokenizer, args.seqs)
    for engine, used in ((plain, []), (lora, []), (lora, adapters)):  # warm-up: compiles every shape once
        run(engine, prompts[:4], 8, used)
    rows = {"base model, plain engine": [], "base model, LoRA engine": [], f"{args.adapters} adapters": []}
    for _ in range(args.rounds):
        rows["base model, plain engine"].append(run(plain, prompts, args.max_tokens, []))
        rows["base model, LoRA engine"].append(run(lora, prompts, args.max_tokens, []))
        rows[f"{args.adapters} adapters"].append(run(lora, prompts, args.max_tokens, adapters))
    base = statistics.median(rows["base model, plain engine"])
    print(f"{args.seqs} sequences x {args.max_tokens} tokens, {args.threads} torch thread(s), "
          f"{args.rounds} rounds (median, [all])")
    for name, figures in rows.items():
        median = statistics.median(figures)
        print(f"  {name:<26} {median:8.0f} tok/s  {median / base:5.2f}x  [{', '.join(f'{f:.0f}' for f in figures)}]")
    print(f"adapter load (read + check, rank 8, {len(TARGETS)} modules x 4 layers): "
          f"median {statistics.median(load_ms):.1f} ms, max {max(load_ms):.1f} ms")
    print(f"adapter install into a slot: median {statistics.median(install_ms):.2f} ms, max {max(install_ms):.2f} ms")
    print(f"loads {lora.lora_stats()['loads']}, evictions {lora.lora_stats()['evictions']}")


if __name__ == "__main__":
    main()
