"""Which LoRA adapter a model id names, and where its files are: the configured adapters (`lora.adapters`),
those loaded at runtime (deployments/lora_registry.py) and `<lora.dynamic_path>/<name>/`, in that order.

An id names an adapter as `<base>:<adapter>` (Ray Serve LLM's form) or as the adapter's own name (vLLM's).
Whether the files exist and fit the base is the model replica's to find out (it loads them on first use)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath

from app.api.errors import ConduitError, invalid, model_not_found
from app.config import ADAPTER_NAME, LoraConfig


@dataclass(frozen=True)
class Target:
    """What a request runs on: a base model, with or without an adapter."""

    model: str  # the base model's name
    lora: str | None = None  # the adapter's key on the model replicas (PreparedRequest.lora)
    lora_path: str | None = None


class LoraTable:
    def __init__(self, configs: dict[str, LoraConfig], registry=None):
        """`configs`: each base model's `lora` block (models without one take no adapter);
        `registry`: the LoraRegistry deployment's handle (runtime loads), if the app has one."""
        self.configs = configs
        self.registry = registry

    async def resolve(self, model_id: str, name: str, base: str | None = None) -> Target:
        """Adapter `name` of `base` (of any base when None); 404 naming `model_id` when there is none."""
        bases = [base] if base is not None else list(self.configs)
        if (base is not None and base not in self.configs) or not ADAPTER_NAME.fullmatch(name):  # never a path (`..`)
            raise model_not_found(model_id)
        for b in bases:
            if (path := self.configs[b].adapters.get(name)) is not None:
                return Target(b, name, path)
        if self.registry is not None and (found := await self.registry.find.remote(name, base)) is not None:
            return Target(found.base, found.key, found.path)
        for b in bases:
            if (root := self.configs[b].dynamic_path) is not None:
                return Target(b, name, f"{root.rstrip('/')}/{name}")
        raise model_not_found(model_id)

    async def listing(self) -> list[tuple[str, str]]:
        """(adapter name, base) of every configured and runtime-loaded adapter."""
        listed = [(name, base) for base, config in self.configs.items() for name in config.adapters]
        if self.registry is not None:
            listed += [(a.name, a.base) for a in await self.registry.listing.remote()]
        return listed


# runtime loading (POST /v1/load_lora_adapter, /v1/unload_lora_adapter) -------------------------------
def allowed_path(config: LoraConfig, path: str) -> str:
    """`path` if it lies under the model's `dynamic_path` (the one directory runtime loads may read);
    400 naming `lora_path` otherwise, `..` included."""
    root = config.dynamic_path
    if root is None:
        raise invalid("This model loads no LoRA adapters at runtime: its lora.dynamic_path is not set.", "lora_path")
    if ".." in PurePosixPath(path).parts or "\0" in path:
        raise invalid("lora_path must not contain `..`.", "lora_path")
    if "://" in root:  # an fsspec URL: the same prefix
        inside = path.startswith(root.rstrip("/") + "/")
    else:
        real_root, real_path = os.path.realpath(root), os.path.realpath(path)
        inside = os.path.commonpath([real_root, real_path]) == real_root and real_path != real_root
    if not inside:
        raise invalid(f"lora_path must lie under this model's lora.dynamic_path ({root}).", "lora_path")
    return path


def runtime_name(models, lora_name: str) -> tuple[str, str]:
    """(base model, adapter name) of a runtime load's `lora_name`: `<base>:<adapter>`, or the adapter's
    own name when one model serves LoRA adapters."""
    base, colon, adapter = lora_name.rpartition(":")
    if colon and base in models.ids:
        base = models.ids[base]
    elif len(models.lora.configs) == 1:
        base, adapter = next(iter(models.lora.configs)), lora_name
    else:
        raise invalid("Several models serve LoRA adapters: name it as `<base>:<adapter>`.", "lora_name")
    if base not in models.lora.configs:
        raise invalid(f"The model `{base}` serves no LoRA adapters.", "lora_name")
    if not ADAPTER_NAME.fullmatch(adapter):
        raise invalid("lora_name must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit.",
                      "lora_name")
    if adapter in models.ids or adapter in models.lora.configs[base].adapters:
        raise invalid(f"`{adapter}` is a configured model or adapter already.", "lora_name")
    return base, adapter


async def load_at_runtime(models, lora_name: str, lora_path: str) -> None:
    """Registers the adapter once one model replica has read and checked its files (a bad one is
    refused here, not on its first request); the other replicas read it on first use."""
    if models.lora is None or models.lora.registry is None:
        raise invalid("No model here serves LoRA adapters.", "lora_name")
    base, name = runtime_name(models, lora_name)
    path = allowed_path(models.lora.configs[base], lora_path)
    entry = await models.lora.registry.add.remote(base, name, path)
    if entry is None:
        raise invalid(f"The LoRA adapter `{name}` has already been loaded.", "lora_name")
    try:
        await models.handle(base, entry.key).load_lora.remote(entry.key, path)
    except ConduitError as e:
        await models.lora.registry.remove.remote(base, name)
        if e.status == 404:
            raise ConduitError(f"No LoRA adapter found at `{lora_path}`.", 404, param="lora_path",
                               code="lora_adapter_not_found") from None
        raise


async def unload_at_runtime(models, lora_name: str) -> None:
    """Forgets a runtime-loaded adapter: new requests for it get 404; streams using it run to their end,
    and the replicas' caches let its key age out (a later load of the name gets a new key)."""
    if models.lora is None or models.lora.registry is None:
        raise invalid("No model here serves LoRA adapters.", "lora_name")
    base, colon, name = lora_name.rpartition(":")
    if not (colon and base in models.ids):
        base, name = None, lora_name
    registry = models.lora.registry
    found = await registry.find.remote(name, models.ids[base] if base else None)
    if found is None or await registry.remove.remote(found.base, found.name) is None:
        raise ConduitError(f"The LoRA adapter `{lora_name}` cannot be found.", 404, param="lora_name",
                           code="lora_adapter_not_found")
