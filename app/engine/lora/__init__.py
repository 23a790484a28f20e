"""Multi-LoRA for the engine (docs/lora.md): adapters read from peft directories (adapter.py), the
replica's fixed adapter slots (slots.py) and the per-token grouped delta in the model's Linear layers
(layer.py)."""

from app.engine.lora.adapter import LoraAdapter, LoraError, load_adapter

__all__ = ["LoraAdapter", "LoraError", "load_adapter"]
