"""Loading a configured model and its tokenizer the same way in every deployment.

Which `source:` is a path and which a Hugging Face id is decided by `model_source`, on the node
that loads the model, so that a directory missing there is an error naming it rather than a
download of whatever Hub repository happens to have that name."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

from app.config import (
    PACKAGE_SOURCE,
    PROJECT_ROOT,
    ConfigError,
    EmbeddingModelConfig,
    EngineConfig,
    ModelConfig,
)

log = logging.getLogger("conduit.loading")


def model_source(config: ModelConfig | EmbeddingModelConfig) -> str:
    """The directory or Hugging Face id to load `config`'s model from. The rule:

    - a source starting with `/`, `.` (`./x`, `../x`, `.cache/x`) or `~` is a path: a local
      directory (relative ones from the Conduit checkout), never a Hub id (no Hub id starts so);
    - a bare `a/b` or `a` is the checkout's directory of that name when there is one, else a Hub
      id, unless it cannot be one (e.g. `a/b/c`) or its first part is a directory of the checkout
      (`models/x` where `models/` exists): then it is a path missing on this node;
    - `package:MODULE` is checked when the config is parsed.

    A missing path is a ConfigError naming the model, the source and the directory looked for."""
    if config.source.startswith(PACKAGE_SOURCE):
        return config.resolved_source
    source = config.source
    if source.startswith("~"):  # Ray's processes do not expand it, and each node's home differs
        raise _missing(config, f"{source} starts with '~', which is not expanded: write the absolute path")
    local = (PROJECT_ROOT / source).resolve()  # an absolute source stays itself
    if local.is_dir():
        return str(local)
    if _is_path(source):
        raise _missing(config, f"{local} is not a directory on this node ({socket.gethostname()})")
    return source


def _is_path(source: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if source.startswith((".", "/")) or (PROJECT_ROOT / Path(source).parts[0]).is_dir():
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return False


def _missing(config: ModelConfig | EmbeddingModelConfig, why: str) -> ConfigError:
    hint = (" (build_demo_if_missing builds it only where the app is built: run `conduit demo-model` on"
            " every node, or build it into the image)") if getattr(config, "build_demo_if_missing", False) else ""
    return ConfigError(f"model {config.name!r}: source {config.source!r} is a local path, but {why}{hint}. "
                       "A Hugging Face id is `name` or `org/name`; start a path with ./ or / to say it is one")


def load_tokenizer(config: ModelConfig | EmbeddingModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_source(config), trust_remote_code=config.trust_remote_code)


def resolved_engine_config(config: ModelConfig) -> EngineConfig:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_source(config), trust_remote_code=config.trust_remote_code)
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
    source = model_source(config)
    log.info("loading model %s from %s on %s (%s) ...", config.name, source, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        source,
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

    source, remote = model_source(config), config.trust_remote_code
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
    return LLMEngine(model, load_tokenizer(config), config.engine, runner=runner, lora=config.lora)
