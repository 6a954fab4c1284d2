"""Request validation messages and the mapping from exceptions to status codes.

Both doors share these: gRPC sends the status code, the HTTP door maps it to an HTTP
status (guard.http.errors). Every message names the field it is about, so a client can
fix the request without reading guard's code.
"""

from __future__ import annotations

import enum

import grpc


class Invalid(str, enum.Enum):
    INPUT_MISSING = "input: set exactly one of prompt or messages"
    PROMPT_EMPTY = "{field}: must not be empty"
    MESSAGES_EMPTY = "{field}: must contain at least one message"
    MESSAGE_ROLE = "{field}[{index}].role: must be one of {allowed} (got {value!r})"
    MAX_TOKENS = "{field}: must be between 1 and {limit} (got {value})"
    TEMPERATURE = "{field}: must be >= 0.0 and <= 2.0 (got {value})"
    TOP_P = "{field}: must be > 0.0 and <= 1.0 (got {value})"
    STOP = "{field}: at most {limit} strings, each non-empty (got {value!r})"
    N = "{field}: policy {policy!r} allows at most {limit} choices per request (got {value})"
    CANDIDATES_EMPTY = "candidates: must contain at least one candidate"
    CANDIDATES_TOO_MANY = "candidates: at most {limit} candidates (got {value})"
    METADATA = "metadata: at most {entries} entries of at most {chars} characters each"
    NO_REWARD = "policy: policy {value!r} has no best_of_n step, so it has no reward source to score with"

    def format(self, **values) -> str:  # type: ignore[override]
        return self.value.format(**values)


class GuardError(Exception):
    """An error with a gRPC status code and a client-facing message."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(GuardError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Cancelled(GuardError):
    code = grpc.StatusCode.CANCELLED


class NotFound(GuardError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(GuardError):
    """The request is well formed but the server's state refuses it (e.g. feedback while the audit log is off)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(GuardError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GuardError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(GuardError):
    """Too many requests; `retry_after` seconds is when trying again can succeed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps any exception from the pipeline or upstream to a status and message."""
    from guard.policy.store import UnknownPolicy
    from guard.rerank import RerankError
    from guard.upstream.client import (
        UpstreamError,
        UpstreamMisconfigured,
        UpstreamRejected,
        UpstreamTimeout,
        UpstreamUnavailable,
    )

    # Also an upstream's HTTP 429 (UpstreamRateLimited is a ResourceExhausted).
    if isinstance(exc, GuardError):
        return exc.code, str(exc)
    if isinstance(exc, UnknownPolicy):
        return grpc.StatusCode.NOT_FOUND, f"policy: {exc.args[0] if exc.args else exc}"
    if isinstance(exc, RerankError):
        # The reward source failed (model missing, remote scorer down): the operator must act.
        return grpc.StatusCode.UNAVAILABLE, f"reward: {exc}"
    if isinstance(exc, UpstreamTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, UpstreamMisconfigured):
        # Refused credentials, a missing model: guard's setup, not the client's request, is wrong.
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, UpstreamRejected):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, UpstreamUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, UpstreamError):
        # The upstream misbehaved (HTTP 5xx, garbage): the request itself may be fine to retry.
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
