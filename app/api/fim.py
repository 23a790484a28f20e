"""Fill-in-the-middle prompts for code-completion clients (`prompt` + `suffix`): prefix, suffix
and middle wrapped in the model's own FIM tokens, prefix-suffix-middle order."""

from __future__ import annotations

from app.api.errors import invalid

# (prefix, suffix, middle) spellings used by common code models: StarCoder / the demo model, Qwen
FIM_TOKENS = [("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")]


def fim_ids(tokenizer, prefix_ids: list[int], suffix: str) -> list[int]:
    vocab = tokenizer.get_vocab()
    names = next((names for names in FIM_TOKENS if all(n in vocab for n in names)), None)
    if names is None:
        raise invalid("suffix is not supported: this model's tokenizer has no fill-in-the-middle tokens", "suffix")
    pre, suf, mid = (vocab[n] for n in names)
    return [pre, *prefix_ids, suf, *tokenizer.encode(suffix, add_special_tokens=False), mid]
