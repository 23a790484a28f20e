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
        headers: dict[str, str] | None = None,  # sent with the error response (e.g. Retry-After)
    ):
        # all in args, so it pickles across Ray with nothing lost
        super().__init__(message, status, type, param, code, headers)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def __str__(self) -> str:
        return self.message


def invalid(message: str, param: str | None = None, code: str | None = None) -> ConduitError:
    return ConduitError(message, 400, "invalid_request_error", param, code)


def unavailable(message: str, code: str, retry_after_s: int = 1) -> ConduitError:
    """503: the server cannot take this request now; the client may retry after a short wait."""
    return ConduitError(message, 503, "server_error", None, code, {"retry-after": str(retry_after_s)})


def stream_failure(e: Exception) -> ConduitError:
    """What a stream reports when it fails after its 200 was sent: the error itself, or a 500."""
    return e if isinstance(e, ConduitError) else ConduitError(f"generation failed: {e}", 500, "server_error")


def internal_error(e: Exception) -> ConduitError:
    """A failure no layer mapped to an API error (a bug): a 500 that names it."""
    return ConduitError(f"internal error: {type(e).__name__}: {e}", 500, "server_error", None, "internal_error")


def model_not_found(model: str) -> ConduitError:
    return ConduitError(f"The model `{model}` does not exist.", 404, "invalid_request_error", "model", "model_not_found")
