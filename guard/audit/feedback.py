"""Feedback on an answer guard gave: a rating (thumbs or 1-5), a preferred best_of_n candidate, a corrected
answer, a comment. Stored beside the audit record of the request it is about, and turned into preference
pairs offline (`guard export preferences`).

Feedback names its request by id, and request ids are the client's (x-request-id) so they can repeat:
feedback is about the newest record of that id *of the caller's tenant*. A record of another tenant is
"not found", exactly as an id nobody used: a key never learns which ids other tenants sent.

Both doors validate alike here; every message starts with the field it is about.
"""

from __future__ import annotations

from dataclasses import dataclass

from guard import limits
from guard.audit.record import AuditRecord, ChoiceRecord
from guard.errors import FailedPrecondition, InvalidArgument, NotFound

MAX_COMMENT_CHARS = 2000
RATINGS = range(1, 6)
# What guard_feedback_total counts, one increment per kind a feedback carries.
KINDS = ("thumbs_up", "thumbs_down", "rating", "preferred", "correction", "comment")


@dataclass(frozen=True)
class Feedback:
    request_id: str
    thumbs: bool | None = None  # True: thumbs up
    rating: int | None = None  # 1 (worst) to 5 (best); not with thumbs
    preferred_index: int | None = None  # the best_of_n candidate the user prefers
    correction: str | None = None  # the answer the user would have wanted
    comment: str = ""
    choice: int = 0  # which answer of an HTTP request with n > 1 (each ran the whole policy)
    tenant: str = ""  # set by guard: the caller's tenant
    time: float = 0.0  # set by guard: unix seconds when it arrived

    @property
    def kinds(self) -> list[str]:
        kinds = []
        if self.thumbs is not None:
            kinds.append("thumbs_up" if self.thumbs else "thumbs_down")
        if self.rating is not None:
            kinds.append("rating")
        if self.preferred_index is not None:
            kinds.append("preferred")
        if self.correction is not None:
            kinds.append("correction")
        if self.comment:
            kinds.append("comment")
        return kinds


@dataclass(frozen=True)
class FoundRecord:
    """A record a store found for feedback, with the key its feedback is stored under."""

    key: int
    record: AuditRecord


def check_fields(feedback: Feedback) -> None:
    """What needs no audit record: InvalidArgument naming the field."""
    if not feedback.request_id:
        raise InvalidArgument("request_id: required (the request_id of the answer, or the x-request-id it was sent with)")
    if len(feedback.request_id) > limits.MAX_REQUEST_ID_CHARS or not all("!" <= c <= "~" for c in feedback.request_id):
        raise InvalidArgument(
            f"request_id: at most {limits.MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces "
            f"(got {feedback.request_id[:40]!r})"
        )
    if feedback.thumbs is not None and feedback.rating is not None:
        raise InvalidArgument("rating: give thumbs or a rating, not both")
    if feedback.rating is not None and feedback.rating not in RATINGS:
        raise InvalidArgument(f"rating: must be between {RATINGS.start} and {RATINGS.stop - 1} (got {feedback.rating})")
    if feedback.preferred_index is not None and feedback.preferred_index < 0:
        raise InvalidArgument(f"preferred_index: must be >= 0 (got {feedback.preferred_index})")
    if feedback.choice < 0:
        raise InvalidArgument(f"choice: must be >= 0 (got {feedback.choice})")
    if feedback.correction is not None:
        if not feedback.correction.strip():
            raise InvalidArgument("correction: must not be empty")
        limits.text(feedback.correction, "correction")
    if len(feedback.comment) > MAX_COMMENT_CHARS:
        raise InvalidArgument(f"comment: at most {MAX_COMMENT_CHARS} characters (got {len(feedback.comment)})")
    if feedback.thumbs is None and feedback.rating is None and feedback.preferred_index is None and feedback.correction is None:
        raise InvalidArgument("rating: give thumbs or a rating (1-5), a preferred_index or a correction (a comment alone is not enough)")


def not_found(request_id: str) -> NotFound:
    # The same words whether the id is unknown or another tenant's.
    return NotFound(f"request_id: no request {request_id!r} of this caller in the audit log")


def check_against(feedback: Feedback, record: AuditRecord) -> ChoiceRecord:
    """What the record allows (FailedPrecondition, InvalidArgument); returns the answer the feedback is about."""
    rid = feedback.request_id
    if record.outcome == "error":
        raise FailedPrecondition(f"request_id: request {rid!r} failed ({record.status}): it has no answer to give feedback on")
    if record.text != "full":
        raise FailedPrecondition(
            f"request_id: feedback cannot become preferences because policy {record.policy!r} keeps no text "
            f"(audit: {{text: {record.text}}}); its policy needs audit: {{text: full}}"
        )
    answers = len(record.choices)
    if feedback.choice >= answers:
        raise InvalidArgument(
            f"choice: request {rid!r} has {answers} answer{'s' if answers != 1 else ''}, so choice must be below {answers} "
            f"(got {feedback.choice})"
        )
    choice = record.choices[feedback.choice]
    index = feedback.preferred_index
    if index is not None:
        if not choice.candidates:
            raise InvalidArgument(
                f"preferred_index: request {rid!r} was not best_of_n (policy {record.policy!r} chose among no candidates)"
            )
        candidate = next((c for c in choice.candidates if c.index == index), None)
        if candidate is None:
            raise InvalidArgument(
                f"preferred_index: must be between 0 and {len(choice.candidates) - 1}: request {rid!r} had "
                f"{len(choice.candidates)} candidates (got {index})"
            )
        if candidate.refused_by:
            raise InvalidArgument(
                f"preferred_index: candidate {index} was refused (by {candidate.refused_by!r}) and never shown; "
                "prefer one whose text the trace showed"
            )
    return choice
