"""One error type for every layer; each wire format renders it in its own shape."""

from __future__ import annotations


class ConduitError(Exception):
    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        # all in args, so it pickles across Ray with nothing lost
        super().__init__(message, status, type, param, code)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def __str__(self) -> str:
        return self.message


def invalid(message: str, param: str | None = None, code: str | None = None) -> ConduitError:
    return ConduitError(message, 400, "invalid_request_error", param, code)


def model_not_found(model: str) -> ConduitError:
    return ConduitError(f"The model `{model}` does not exist.", 404, "invalid_request_error", "model", "model_not_found")
