"""Bounds on what one request may ask for, shared by both doors (gRPC and HTTP).

Each door names fields its own way (`sampling.max_tokens` in gRPC, `max_tokens` in
the OpenAI API), so the checks take the field names; the bounds and messages live here.
"""

from __future__ import annotations

import uuid

from collections.abc import Sequence

from guard.errors import Invalid, InvalidArgument
from guard.types import Sampling

MAX_TOKENS = 32768
MAX_STOP_STRINGS = 8
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1  # what a signed 64-bit seed (vLLM's, the proto's) holds
# A request as it arrives (gRPC message or HTTP body): bounded before anything parses it.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_MESSAGES = 1024
MAX_TEXT_CHARS = 1_000_000  # a prompt, or one message's content
MAX_METADATA_ENTRIES = 32
MAX_METADATA_CHARS = 256
MAX_SCORE_CANDIDATES = 256
ROLES = ("system", "user", "assistant")


def sampling(
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: Sequence[str],
    prefix: str = "",
) -> Sampling:
    """Validated sampling; `prefix` is how the door names the sampling fields ("sampling." in gRPC)."""
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS:
        raise InvalidArgument(Invalid.MAX_TOKENS.format(field=f"{prefix}max_tokens", limit=MAX_TOKENS, value=max_tokens))
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise InvalidArgument(Invalid.TEMPERATURE.format(field=f"{prefix}temperature", value=temperature))
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InvalidArgument(Invalid.TOP_P.format(field=f"{prefix}top_p", value=top_p))
    if seed is not None and not MIN_SEED <= seed <= MAX_SEED:
        raise InvalidArgument(f"{prefix}seed: must be between {MIN_SEED} and {MAX_SEED} (got {seed})")
    stop = tuple(stop)
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise InvalidArgument(Invalid.STOP.format(field=f"{prefix}stop", limit=MAX_STOP_STRINGS, value=list(stop)))
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)


def text(value: str, field: str) -> str:
    if len(value) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"{field}: at most {MAX_TEXT_CHARS} characters (got {len(value)})")
    return value


def message_count(count: int) -> None:
    if count > MAX_MESSAGES:
        raise InvalidArgument(f"messages: at most {MAX_MESSAGES} messages (got {count})")


MAX_REQUEST_ID_CHARS = 128


def request_id(given: str | None) -> str:
    """The caller's x-request-id (printable ASCII, no spaces, at most 128 characters), or a new one."""
    if not given:
        return uuid.uuid4().hex
    if len(given) > MAX_REQUEST_ID_CHARS or not all("!" <= c <= "~" for c in given):
        raise InvalidArgument(
            f"x-request-id: at most {MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces (got {given[:40]!r})"
        )
    return given


def metadata(values: dict[str, str]) -> dict[str, str]:
    if len(values) > MAX_METADATA_ENTRIES or any(
        len(k) > MAX_METADATA_CHARS or len(v) > MAX_METADATA_CHARS for k, v in values.items()
    ):
        raise InvalidArgument(Invalid.METADATA.format(entries=MAX_METADATA_ENTRIES, chars=MAX_METADATA_CHARS))
    return dict(values)
