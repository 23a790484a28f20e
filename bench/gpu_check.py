"""GPU check (not run in CI; needs CUDA): the engine's greedy outputs on one GPU equal transformers'
`generate` token for token (the paged attention kernel, app/engine/attention.py, compiled for
Triton), and the same outputs come from tensor parallel over N GPUs (NCCL), layer-sharded with
accelerate's device_map and with n-gram speculative decoding; with LoRA adapters (made here with
peft, one per request in turn) they equal peft's merged model's `generate`. The output throughput
of each is printed as a table.

    .venv/bin/python bench/gpu_check.py                      # demo model, N = every visible GPU
    .venv/bin/python bench/gpu_check.py --model Qwen/Qwen2.5-7B-Instruct --tp 4 --requests 64

Exits 0 when the single-GPU run equals `generate` and every layout's greedy tokens equal the
single-GPU run's, 1 when one differs, 2 without CUDA. In bfloat16 a TP all-reduce sums in a
different order than one GPU does, and the paged kernel in a different order than `generate`'s
SDPA, so a long greedy run can legitimately fork after a near-tie; `--dtype float32` makes both
comparisons strict.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import PROJECT_ROOT, ModelConfig  # noqa: E402
from app.engine.sampling_params import SamplingParams  # noqa: E402


def workload(tokenizer, count: int, max_tokens: int) -> dict[str, tuple[list[int], int]]:
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dogs while python code returns values from ray".split()
    return {
        f"r{i}": (tokenizer.encode(" ".join(rng.choice(words) for _ in range(rng.randint(8, 200)))), max_tokens)
        for i in range(count)
    }


def run(engine, requests, adapters: dict | None = None) -> tuple[dict[str, list[int]], float]:
    """Greedy outputs of every request (`adapters`: request id -> its LoRA adapter), and output tokens
    per second over the whole run."""
    for request_id, (prompt, max_tokens) in requests.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                           lora=(adapters or {}).get(request_id))
    outputs: dict[str, list[int]] = {}
    started = time.perf_counter()
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
    elapsed = time.perf_counter() - started
    return outputs, sum(map(len, outputs.values())) / elapsed


def generate_reference(model, requests) -> dict[str, list[int]]:
    """transformers' own greedy decoding of every request, one at a time (no engine involved)."""
    import torch

    outputs = {}
    with torch.inference_mode():
        for request_id, (prompt, max_tokens) in requests.items():
            ids = torch.tensor([prompt], device=model.device)
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            outputs[request_id] = out[0, len(prompt):].tolist()
    return outputs


def lora_check(args, requests, root: Path) -> tuple[float, int]:
    """(output tok/s, requests equal to peft's merged model) with request i on adapter i % 4."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from app.config import LoraConfig
    from app.engine.lora import load_adapter
    from app.loading import build_engine
    from bench.lora import make_adapters  # rank 8 on every projection, random non-zero weights

    dirs = make_adapters(args.model, root, 4)
    config = ModelConfig(name="check", source=args.model, lora=LoraConfig(max_adapters_per_replica=4, max_rank=8),
                         engine={"max_num_seqs": args.requests, "max_model_len": 1024, "dtype": args.dtype,
                                 "device": args.device})
    engine = build_engine(config, args.device)
    dtype = next(engine.model.parameters()).dtype  # the merged reference runs in the engine's dtype
    loaded = [load_adapter(f"a{i}", str(d), engine.model, 8) for i, d in enumerate(dirs)]
    adapter_of = {rid: i % len(dirs) for i, rid in enumerate(requests)}
    outputs, throughput = run(engine, requests, {rid: loaded[i] for rid, i in adapter_of.items()})
    del engine
    same = 0
    for i, d in enumerate(dirs):
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        merged = peft.PeftModel.from_pretrained(base, str(d)).merge_and_unload().eval().to(args.device)
        mine = {rid: requests[rid] for rid, a in adapter_of.items() if a == i}
        expected = generate_reference(merged, mine)
        same += sum(outputs[rid] == expected[rid] for rid in mine)
        del merged
        torch.cuda.empty_cache()
    return throughput, same


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(PROJECT_ROOT / ".cache" / "demo-model"))
    parser.add_argument("--tp", type=int, default=0, help="tensor-parallel size (default: every visible GPU)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: try this script without a GPU")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_check.py needs CUDA: no GPU is visible to torch here (the CPU test of the same "
              "equality is tests/e2e/test_tensor_parallel.py)", file=sys.stderr)
        return 2
    from app.demo_model import build_demo_model
    from app.loading import build_engine

    if args.model == str(PROJECT_ROOT / ".cache" / "demo-model"):
        build_demo_model(args.model)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 1
    tp = args.tp or gpus
    base = {"max_num_seqs": args.requests, "max_model_len": 1024, "dtype": args.dtype, "device": args.device}
    # speculation on in every step (by default it steps aside from 8 running sequences)
    layouts = {"1 GPU": {}, "1 GPU, n-gram speculation": {"speculative": {"method": "ngram",
                                                                          "disable_by_batch_size": None}}}
    if tp > 1:
        import ray

        ray.init(address="local", num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        layouts[f"tensor parallel x{tp}"] = {"tensor_parallel_size": tp}
        layouts[f"device_map x{gpus}"] = {"device_map": "balanced", "num_devices": gpus}
    rows, reference, requests, generate_same = [], None, None, None
    for name, extra in layouts.items():
        engine = build_engine(ModelConfig(name="check", source=args.model, engine={**base, **extra}), args.device)
        requests = requests or workload(engine.tokenizer, args.requests, args.max_tokens)
        run(engine, dict(list(requests.items())[:2]))  # warm-up: kernels, allocator, NCCL communicators
        outputs, throughput = run(engine, requests)
        if reference is None:
            reference = outputs
            expected = generate_reference(engine.model, requests)
            generate_same = sum(outputs[r] == expected[r] for r in requests)
        same = sum(outputs[r] == reference[r] for r in requests)
        rows.append((name, throughput, same))
        if hasattr(engine.runner, "shutdown"):
            engine.runner.shutdown()
        del engine
        torch.cuda.empty_cache()
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        throughput, lora_same = lora_check(args, requests, Path(root))
    print(f"\n{args.model}: {args.requests} requests x {args.max_tokens} tokens, greedy, dtype {args.dtype}, {gpus} GPU(s) "
          f"({torch.cuda.get_device_name(0) if args.device == 'cuda' else 'CPU'})\n")
    print(f"1 GPU engine vs transformers generate: {generate_same}/{len(requests)} requests token for token\n")
    print(f"{'layout':<30}{'output tok/s':>14}{'same tokens as 1 GPU':>24}")
    for name, throughput_of, same in rows:
        print(f"{name:<30}{throughput_of:>14,.0f}{f'{same}/{len(requests)}':>24}")
    print(f"\n1 GPU, 4 LoRA adapters: {throughput:,.0f} output tok/s; {lora_same}/{len(requests)} requests equal "
          "peft's merged model's generate token for token")
    matches = (generate_same == len(requests) and lora_same == len(requests)
               and all(same == len(requests) for *_, same in rows))
    return 0 if matches else 1


if __name__ == "__main__":
    sys.exit(main())
