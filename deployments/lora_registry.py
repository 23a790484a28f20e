"""LoRA adapters loaded at runtime (POST /v1/load_lora_adapter), by base model: one small deployment, so
every ingress replica sees the same names and an unload is seen by all of them at once.

Each runtime load gets a key of its own (`name#generation`): the model replicas cache adapters by key
(Serve's multiplexed model id), so a name unloaded and loaded again from other files never meets the
old weights still cached on a replica."""

from __future__ import annotations

from dataclasses import dataclass

from ray import serve


@dataclass(frozen=True)
class Registered:
    base: str  # the model it adapts
    name: str  # what clients send
    key: str  # the model replicas' id for it
    path: str


@serve.deployment(name="LoraRegistry", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class LoraRegistry:
    def __init__(self):
        self.adapters: dict[tuple[str, str], Registered] = {}  # (base, name) -> adapter
        self.generation = 0

    async def add(self, base: str, name: str, path: str) -> Registered | None:
        """Registers `name` for `base`; None when that name is taken already."""
        if (base, name) in self.adapters:
            return None
        self.generation += 1
        entry = self.adapters[base, name] = Registered(base, name, f"{name}#{self.generation}", path)
        return entry

    async def remove(self, base: str, name: str) -> Registered | None:
        return self.adapters.pop((base, name), None)

    async def find(self, name: str, base: str | None = None) -> Registered | None:
        """`name` of `base`, or of any base when `base` is None."""
        if base is not None:
            return self.adapters.get((base, name))
        return next((a for a in self.adapters.values() if a.name == name), None)

    async def listing(self) -> list[Registered]:
        return list(self.adapters.values())
