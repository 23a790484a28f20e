"""Why the engine refused or ended one request. Each ends that request only: the engine loop and the
other sequences of its batch go on (`engine.py`)."""

from __future__ import annotations


class RequestRejected(ValueError):
    """The request cannot be served as asked (a 400 naming `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)  # in args: it pickles across Ray with nothing lost
        self.message, self.param = message, param

    def __str__(self) -> str:
        return self.message


class QueueFull(RuntimeError):
    """The request's key has its share of the model's queue, or the whole queue is full (a 503)."""
