"""Loading a configured model and its tokenizer the same way in every deployment."""

from __future__ import annotations

import logging
import time

from app.config import EmbeddingModelConfig, EngineConfig, ModelConfig

log = logging.getLogger("conduit.loading")


def load_tokenizer(config: ModelConfig | EmbeddingModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.resolved_source, trust_remote_code=config.trust_remote_code)


def resolved_engine_config(config: ModelConfig) -> EngineConfig:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(config.resolved_source, trust_remote_code=config.trust_remote_code)
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return config.engine.resolved(getattr(text_config, "max_position_embeddings", None))


def pick_device(engine: EngineConfig | EmbeddingModelConfig) -> str:
    import torch

    if engine.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return engine.device


def load_model(config: ModelConfig, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = config.engine.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    started = time.monotonic()
    log.info("loading model %s from %s on %s (%s) ...", config.name, config.resolved_source, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        config.resolved_source,
        dtype=getattr(torch, dtype),
        trust_remote_code=config.trust_remote_code,
        attn_implementation="sdpa",
    ).to(device)
    log.info("model %s loaded in %.1f s", config.name, time.monotonic() - started)
    return model
