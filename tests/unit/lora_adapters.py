"""Real peft LoRA adapters of the demo model, made in the test session (non-zero weights), and peft's
own merged-model greedy output as the reference the engine must equal."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# name -> peft LoraConfig arguments: different ranks, targets, alphas, and one rsLoRA
ADAPTERS = {
    "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all8rs": dict(r=8, lora_alpha=16, use_rslora=True,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "od16": dict(r=16, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
    "ku2": dict(r=2, lora_alpha=32, target_modules=["k_proj", "up_proj"]),
}


def fresh_model(model_path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path).eval()


def make_adapter(base, directory: Path, seed: int, **lora_args) -> Path:
    """Save a LoRA adapter of `base` (left unchanged) with random non-zero A and B."""
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **lora_args))
    model.save_pretrained(directory)
    return directory


def make_adapters(base, root: Path) -> dict[str, Path]:
    return {name: make_adapter(base, root / name, seed, **args) for seed, (name, args) in enumerate(ADAPTERS.items())}


def merged(base, adapter_dir: Path):
    """peft's merged model: base + adapter, merged with merge_and_unload() on a copy."""
    import peft

    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).merge_and_unload().eval()


@torch.inference_mode()
def greedy_generate(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         do_sample=False)
    return out[0, len(prompt_ids):].tolist()
