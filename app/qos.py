"""Priority classes: how a request's numeric `priority` (vLLM's field: lower runs first, default 0)
maps to the three classes the scheduler orders by, and how a key's maximum class caps it.

The classes are bands of the integer, so vLLM clients keep working unchanged:
  interactive  priority < 0
  standard     priority == 0   (the default)
  batch        priority > 0
A waiting request of a better class is admitted before any of a worse one; within a class, the
numeric priority orders one key's own requests, and keys share the class by weight (scheduler.py).
"""

from __future__ import annotations

from typing import Literal

PriorityClass = Literal["interactive", "standard", "batch"]
CLASSES: tuple[PriorityClass, ...] = ("interactive", "standard", "batch")  # best first: a class's rank is its index
PRIORITY_HEADER = "x-conduit-priority"  # the class a call's sequences ran at


def class_rank(priority: int) -> int:
    """0 (interactive), 1 (standard) or 2 (batch)."""
    return 0 if priority < 0 else 1 if priority == 0 else 2


def class_of(priority: int) -> PriorityClass:
    return CLASSES[class_rank(priority)]


def capped(priority: int, max_class: PriorityClass) -> int:
    """`priority`, raised into `max_class`'s band when it asks for a better class (never an error)."""
    floor = {"interactive": priority, "standard": 0, "batch": 1}[max_class]
    return max(priority, floor)
