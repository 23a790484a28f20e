"""The engine's proposer for `engine.speculative`: prompt lookup, or a draft model loaded next to the
target (same device and dtype, its own paged KV cache)."""

from __future__ import annotations

from app.config import EngineConfig
from app.engine.model_runner import forward_size
from app.engine.spec.draft import DraftModelProposer, tokenizers_match
from app.engine.spec.ngram import NgramProposer


def build_proposer(config: EngineConfig, target_model, target_tokenizer):
    """Raises ValueError naming engine.speculative.draft_model when the draft's tokenizer cannot draft
    for the target's (its ids would mean other tokens): `conduit validate` says so before a deploy, and a
    replica refuses to start on it rather than serve with every draft rejected."""
    spec = config.speculative
    if spec.method == "ngram":
        return NgramProposer(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # only a draft-model replica loads these

    why = tokenizers_match(target_tokenizer, AutoTokenizer.from_pretrained(spec.draft_model))
    if why is not None:
        raise ValueError(f"engine.speculative.draft_model: {why}")
    param = next(target_model.parameters())
    draft = AutoModelForCausalLM.from_pretrained(spec.draft_model, dtype=param.dtype).to(param.device)
    return DraftModelProposer(draft, spec.draft_num_kv_blocks or config.num_kv_blocks, config.block_size,
                              config.enable_prefix_caching, size=forward_size(config))
