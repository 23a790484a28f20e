"""The engine's proposer for `engine.speculative`: prompt lookup, or a draft model loaded next to the
target (same device and dtype, its own paged KV cache)."""

from __future__ import annotations

from app.config import EngineConfig
from app.engine.spec.draft import DraftModelProposer
from app.engine.spec.ngram import NgramProposer


def build_proposer(config: EngineConfig, target_model):
    spec = config.speculative
    if spec.method == "ngram":
        return NgramProposer(spec)
    from transformers import AutoModelForCausalLM  # only a draft-model replica loads a second model

    param = next(target_model.parameters())
    draft = AutoModelForCausalLM.from_pretrained(spec.draft_model, dtype=param.dtype).to(param.device)
    return DraftModelProposer(draft, spec.draft_num_kv_blocks or config.num_kv_blocks, config.block_size,
                              config.enable_prefix_caching)
