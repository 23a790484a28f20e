"""Build the tiny demo model: a Llama-architecture model with random weights and a byte-level
BPE tokenizer trained on local text. Nothing is downloaded; the result is a normal Hugging Face
model directory that the server loads through `from_pretrained`, like any real model."""

from __future__ import annotations

import json
import logging
import sysconfig
from pathlib import Path

log = logging.getLogger("conduit.demo_model")

EOS = "<|im_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", EOS, "<|pad|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 3000
MAX_POSITIONS = 1024


def _training_text(max_bytes: int = 3_000_000) -> list[str]:
    """Text the tokenizer learns from: the Python standard library's sources, always on disk."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token=EOS,
        pad_token="<|pad|>",
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_demo_model(path: str | Path, seed: int = 0) -> Path:
    """Write the demo model to `path` (skipped when it is already there) and return the path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    log.info("building demo tokenizer (BPE, %d tokens) ...", VOCAB_SIZE)
    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    log.info("building demo model (Llama, random weights, seed %d) ...", seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "conduit_demo.json").write_text(json.dumps({"seed": seed, "built_by": "conduit demo-model"}))
    log.info("demo model written to %s", path)
    return path


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_demo_model(sys.argv[1] if len(sys.argv) > 1 else ".cache/demo-model"))
