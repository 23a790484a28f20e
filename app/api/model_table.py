"""The model table: every id a request may name (a model, its aliases, its LoRA adapters) and the model
deployment's handle it goes to. A dict in the ingress replica: resolving a name is never a Ray hop."""

from __future__ import annotations

from app.api.errors import model_not_found
from app.api.lora_table import LoraTable, Target


class ModelTable:
    """Maps every served id (name or alias) to its model deployment's handle, and ids that name a LoRA
    adapter (`<base>:<adapter>`, or the adapter's own name) to the base model and that adapter."""

    def __init__(self, names: dict[str, list[str]], handles: dict, lora: LoraTable | None = None):
        self.handles = handles
        self.ids = {alias: name for name, aliases in names.items() for alias in [name, *aliases]}
        self.lora = lora

    def resolve(self, model: str) -> str:
        name = self.ids.get(model)
        if name is None:
            raise model_not_found(model)
        return name

    async def target(self, model: str) -> Target:
        """The base model and adapter `model` names; 404 when it names neither."""
        if (name := self.ids.get(model)) is not None:
            return Target(name)
        if self.lora is None:
            raise model_not_found(model)
        base, colon, adapter = model.rpartition(":")
        if colon and base in self.ids:
            return await self.lora.resolve(model, adapter, self.ids[base])
        return await self.lora.resolve(model, model)

    def handle(self, name: str, lora: str | None = None):
        """The deployment's handle; with an adapter's key, Serve's multiplexing carries the key, so the
        router (below) sees it and the replica's cache is keyed by it."""
        handle = self.handles[name]
        return handle if lora is None else handle.options(multiplexed_model_id=lora)
