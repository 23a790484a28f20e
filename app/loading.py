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
        # accelerate spreads the layers over every device the replica was given; its hooks move
        # activations between them, and the KV cache follows each layer's device
        device_map=config.engine.device_map,
    )
    if config.engine.device_map is None:
        model = model.to(device)
    log.info("model %s loaded in %.1f s", config.name, time.monotonic() - started)
    return model


def load_replica_model(config: ModelConfig, device: str):
    """(model, runner) for `LLMEngine`. With tensor parallelism the weights live in the worker
    actors, and `model` stands in with their configs."""
    if config.engine.tensor_parallel_size == 1:
        return load_model(config, device), None
    from transformers import AutoConfig, GenerationConfig

    from app.engine.tensor_parallel import TensorParallelModel, TensorParallelRunner

    source, remote = config.resolved_source, config.trust_remote_code
    try:
        generation_config = GenerationConfig.from_pretrained(source, trust_remote_code=remote)
    except OSError:  # the model ships none
        generation_config = None
    log.info("model %s: %d tensor-parallel workers on %s", config.name, config.engine.tensor_parallel_size, device)
    runner = TensorParallelRunner(config, device)
    hf_config = AutoConfig.from_pretrained(source, trust_remote_code=remote)
    return TensorParallelModel(hf_config, generation_config), runner


def build_engine(config: ModelConfig, device: str):
    """An `LLMEngine` over the configured model, outside Serve (tests, bench/gpu_check.py)."""
    from app.engine.engine import LLMEngine

    config = config.model_copy(update={"engine": resolved_engine_config(config)})
    model, runner = load_replica_model(config, device)
    return LLMEngine(model, load_tokenizer(config), config.engine, runner=runner)
