"""One closed list of error kinds, each with a stable code and an HTTP status."""

from __future__ import annotations

from typing import Any


class ClipsearchError(Exception):
    """Base error: carries a stable machine `code`, a human `detail` and an HTTP status."""

    status_code = 500
    code = "internal_error"

    def __init__(self, detail: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        """The JSON body a client receives."""
        return {"code": self.code, "detail": self.detail, **self.extra}


class InvalidInput(ClipsearchError):
    """The request is well-formed HTTP but its content is unacceptable."""

    status_code = 422
    code = "invalid_input"


class NotFound(ClipsearchError):
    """The named job or image does not exist."""

    status_code = 404
    code = "not_found"


class PayloadTooLarge(ClipsearchError):
    """The request body, a file or an archive exceeds a configured limit."""

    status_code = 413
    code = "payload_too_large"


class Unauthorized(ClipsearchError):
    """No credentials were given where they are required."""

    status_code = 401
    code = "unauthorized"


class Forbidden(ClipsearchError):
    """Credentials were given but are not valid."""

    status_code = 403
    code = "forbidden"


class Conflict(ClipsearchError):
    """The request conflicts with the current state (e.g. cancelling a finished job)."""

    status_code = 409
    code = "conflict"


class Unavailable(ClipsearchError):
    """A dependency (Redis, Milvus, the query service, the model) cannot be used right now."""

    status_code = 503
    code = "unavailable"


class ModelLoadError(ClipsearchError):
    """The CLIP model named by CLIP_MODEL could not be loaded."""

    status_code = 503
    code = "model_unavailable"


class DeadlineExceeded(ClipsearchError):
    """A dependency (the model) did not answer within its deadline."""

    status_code = 504
    code = "timeout"
