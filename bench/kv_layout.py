"""What the paged KV layout costs a decode step (model_runner.py): time one step of the demo model at
batch 32 with ~100-token contexts, and the part of it that paging adds — gathering every layer's K
and V rows from the block pool into the padded batch that attention reads. Prints medians and the share.

    .venv/bin/python bench/kv_layout.py
"""

import statistics
import time

import torch

from app.config import PROJECT_ROOT, EngineConfig
from app.demo_model import build_demo_model
from app.engine.engine import LLMEngine
from app.engine.sampling_params import SamplingParams

BATCH, CONTEXT = 32, 96


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
        engine.add_request(str(i), list(range(10 + i, 10 + i + CONTEXT)), SamplingParams(max_tokens=900, ignore_eos=True))
    engine.step()  # prefill all

    with torch.inference_mode():
        step_ms = median_ms(engine.step)
        cache = engine.runner.cache
        cache.plan(engine.scheduler.running, [1] * BATCH, engine.runner.device)
        _, read, _, _ = cache._plan

        def gather_all_layers():
            for layer in cache.k:
                cache.k[layer].index_select(0, read)
                cache.v[layer].index_select(0, read)

        gather_ms = median_ms(gather_all_layers)
    print(f"demo model, batch {BATCH}, context ~{CONTEXT} tokens, 2 threads")
    print(f"decode step (paged KV):         {step_ms:.2f} ms median")
    print(f"of which the block gather:      {gather_ms:.2f} ms median  ({100 * gather_ms / step_ms:.0f}% of the step)")


if __name__ == "__main__":
    main()
