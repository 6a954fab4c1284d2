"""Request validation messages and the mapping from exceptions to gRPC status codes.

Every message names the field it is about, so a client can fix the request
without reading guard's code.
"""

from __future__ import annotations

import enum

import grpc


class Invalid(str, enum.Enum):
    INPUT_MISSING = "input: set exactly one of prompt or messages"
    PROMPT_EMPTY = "prompt: must not be empty"
    MESSAGES_EMPTY = "messages: must contain at least one message"
    MESSAGE_ROLE = "messages[{index}].role: must be one of system, user, assistant (got {value!r})"
    MAX_TOKENS = "sampling.max_tokens: must be between 1 and {limit} (got {value})"
    TEMPERATURE = "sampling.temperature: must be >= 0.0 and <= 2.0 (got {value})"
    TOP_P = "sampling.top_p: must be > 0.0 and <= 1.0 (got {value})"
    STOP = "sampling.stop: at most 8 strings, each non-empty (got {value!r})"
    CANDIDATES_EMPTY = "candidates: must contain at least one candidate"
    CANDIDATES_TOO_MANY = "candidates: at most {limit} candidates (got {value})"
    METADATA = "metadata: at most 32 entries of at most 256 characters each"
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


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps any exception from the pipeline or upstream to a status and message."""
    from guard.policy.store import UnknownPolicy
    from guard.rerank import RerankError
    from guard.upstream.client import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable

    if isinstance(exc, GuardError):
        return exc.code, str(exc)
    if isinstance(exc, UnknownPolicy):
        return grpc.StatusCode.NOT_FOUND, f"policy: {exc.args[0] if exc.args else exc}"
    if isinstance(exc, RerankError):
        # The reward source failed (model missing, remote scorer down): the operator must act.
        return grpc.StatusCode.UNAVAILABLE, f"reward: {exc}"
    if isinstance(exc, UpstreamTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, UpstreamRejected):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, UpstreamUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, UpstreamError):
        # The upstream misbehaved (HTTP 5xx, garbage): the request itself may be fine to retry.
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
