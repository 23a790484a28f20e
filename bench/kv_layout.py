"""Why model_runner.py keeps each sequence's K/V contiguous: time one decode step of the demo model
at batch 32 against the gather a block-pool layout would add (every layer's K and V for the batch,
gathered from blocks into a padded tensor). Prints medians and the ratio.

    .venv/bin/python bench/kv_layout.py
"""

import statistics
import time

import torch

from app.config import PROJECT_ROOT, EngineConfig
from app.demo_model import build_demo_model
from app.engine.engine import LLMEngine
from app.engine.sampling_params import SamplingParams

BATCH, CONTEXT, BLOCK = 32, 96, 16


def median_ms(fn, repeat: int = 30) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    path = build_demo_model(PROJECT_ROOT / ".cache" / "demo-model")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=BATCH, max_model_len=1024).resolved(1024))
    for i in range(BATCH):
        engine.add_request(str(i), list(range(10, 10 + CONTEXT)), SamplingParams(max_tokens=900, ignore_eos=True))
    engine.step()  # prefill all

    step_ms = median_ms(engine.step)

    cfg = model.config
    heads, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    blocks_per_seq = -(-CONTEXT // BLOCK)
    pool = torch.zeros(BATCH * blocks_per_seq, heads, BLOCK, dim)
    table = torch.randperm(BATCH * blocks_per_seq).view(BATCH, blocks_per_seq)

    def gather_all_layers():
        for _ in range(cfg.num_hidden_layers * 2):  # K and V per layer
            pool[table].transpose(1, 2).reshape(BATCH, heads, blocks_per_seq * BLOCK, dim)

    gather_ms = median_ms(gather_all_layers)
    print(f"demo model, batch {BATCH}, context ~{CONTEXT} tokens, 2 threads")
    print(f"decode step (contiguous slots): {step_ms:.2f} ms median")
    print(f"block-pool gather per step:     {gather_ms:.2f} ms median  (+{100 * gather_ms / step_ms:.0f}% per step)")


if __name__ == "__main__":
    main()
