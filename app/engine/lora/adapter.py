"""Reads one peft LoRA adapter directory into CPU tensors and checks it fits the served model.

Any thread may call `load_adapter` (the replica loads off its event loop); nothing here touches the
engine. The config and weights are read by peft itself (`PeftConfig.from_pretrained`,
`load_peft_weights`): every format peft writes (safetensors, .bin) is read as peft reads it."""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass, field

import torch

PEFT_PREFIX = "base_model.model."
_uids = itertools.count()


class LoraError(ValueError):
    """An adapter that cannot be served. `kind`: "not_found" (no such directory or file) or "invalid"
    (it exists but is not a LoRA adapter of this model within limits); `param` is the request field."""

    def __init__(self, message: str, param: str | None = "model", kind: str = "invalid"):
        super().__init__(message, param, kind)  # in args: it pickles across Ray with nothing lost
        self.message, self.param, self.kind = message, param, kind

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One target Linear's LoRA factors: A [rank, in], B [out, rank], and its scale (alpha / rank, or
    alpha / sqrt(rank) for rsLoRA)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A loaded adapter. Its identity (not its name) keys the replica's slots and the prefix cache: a
    name loaded again from another directory never meets the old one's weights or KV blocks."""

    name: str
    path: str
    rank: int
    modules: dict[str, LoraWeights]  # module path in the model (model.layers.0.self_attn.q_proj) -> factors
    uid: int = field(default_factory=lambda: next(_uids))

    @property
    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for w in self.modules.values())


def load_adapter(name: str, path: str, model, max_rank: int) -> LoraAdapter:
    """Raises LoraError naming what is wrong (see LoraError for the kinds)."""
    local = _local_dir(name, path)
    config = _read_config(name, local)
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_peft_weights

    if not any(os.path.isfile(os.path.join(local, f)) for f in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        # checked here: peft would take a directory without them for a Hub repository id
        raise LoraError(f"adapter {name!r}: no adapter weights in {path}", kind="not_found")
    try:
        state = load_peft_weights(local, device="cpu")
    except Exception as e:
        raise LoraError(f"adapter {name!r}: its weights cannot be read: {e}") from None
    modules = _modules(name, state, config, model, max_rank)
    return LoraAdapter(name, path, max(w.rank for w in modules.values()), modules)


def _local_dir(name: str, path: str) -> str:
    """A local directory holding the adapter: `path` itself, or a copy of a remote (fsspec) one."""
    if "://" not in path or path.startswith("file://"):
        local = path.removeprefix("file://")
        if not os.path.isdir(local):
            raise LoraError(f"adapter {name!r}: no directory at {path}", kind="not_found")
        return local
    import fsspec

    try:
        fs, remote = fsspec.core.url_to_fs(path)
        if not fs.isdir(remote):
            raise LoraError(f"adapter {name!r}: no directory at {path}", kind="not_found")
        local = tempfile.mkdtemp(prefix=f"conduit-lora-{name}-")
        fs.get(remote.rstrip("/") + "/", local, recursive=True)
        return local
    except LoraError:
        raise
    except Exception as e:
        raise LoraError(f"adapter {name!r}: {path} cannot be read: {e}", kind="not_found") from None


def _read_config(name: str, local: str):
    import peft

    if not os.path.isfile(os.path.join(local, "adapter_config.json")):
        raise LoraError(f"adapter {name!r}: no adapter_config.json in its directory", kind="not_found")
    try:
        config = peft.PeftConfig.from_pretrained(local)  # the config class its peft_type names
    except Exception as e:
        raise LoraError(f"adapter {name!r}: adapter_config.json cannot be read: {e}") from None
    if not isinstance(config, peft.LoraConfig):
        raise LoraError(f"adapter {name!r} is a {config.peft_type} adapter, not LoRA")
    # peft reads the JSON without checking types: a wrong one surfaces here, not mid-forward
    for key, value in (("r", config.r), ("lora_alpha", config.lora_alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise LoraError(f"adapter {name!r}: adapter_config.json has {key} = {value!r}, not a positive number")
    unsupported = {
        "use_dora": config.use_dora, "bias": config.bias != "none", "lora_bias": getattr(config, "lora_bias", False),
        "modules_to_save": bool(config.modules_to_save), "alpha_pattern": bool(config.alpha_pattern),
        "fan_in_fan_out": config.fan_in_fan_out,
    }
    bad = [key for key, used in unsupported.items() if used]
    if bad:
        raise LoraError(f"adapter {name!r} uses {', '.join(bad)}, which Conduit does not serve")
    return config


def _modules(name: str, state: dict[str, torch.Tensor], config, model, max_rank: int) -> dict[str, LoraWeights]:
    """The factors by target module, each checked against the model's Linear of that name."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise LoraError(f"adapter {name!r}: weight {key!r} is not a LoRA A/B matrix")
        pairs.setdefault(module, {})[part[0]] = tensor
    if not pairs:
        raise LoraError(f"adapter {name!r} has no LoRA weights")
    modules = {}
    for module, ab in sorted(pairs.items()):
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            raise LoraError(f"adapter {name!r}: module {module!r} lacks its lora_{'A' if a is None else 'B'} weight")
        in_features, out_features = _linear_shape(name, module, model)
        rank = a.shape[0]
        if rank > max_rank:
            raise LoraError(f"adapter {name!r}: rank {rank} exceeds this model's max_rank {max_rank}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (out_features, rank):
            raise LoraError(
                f"adapter {name!r}: {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, but the model's layer "
                f"maps {in_features} -> {out_features} features: an adapter of another base model")
        scale = config.lora_alpha / (rank**0.5 if config.use_rslora else rank)
        modules[module] = LoraWeights(a.float().contiguous(), b.float().contiguous(), scale)
    return modules


def _linear_shape(name: str, module: str, model) -> tuple[int, int]:
    from app.engine.lora.layer import LoraLinear

    try:
        layer = model.get_submodule(module)
    except AttributeError:
        raise LoraError(f"adapter {name!r} targets {module!r}, which this model does not have") from None
    if isinstance(layer, LoraLinear):
        layer = layer.base
    if not isinstance(layer, torch.nn.Linear):
        raise LoraError(f"adapter {name!r} targets {module!r}, a {type(layer).__name__}: only Linear layers "
                        "take LoRA here")
    return layer.in_features, layer.out_features
