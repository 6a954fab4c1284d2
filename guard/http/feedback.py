"""The body of `POST /v1/feedback`: guard's own route (OpenAI has none), so unknown fields are errors that name
them (a misspelt `prefered_index` must not pass silently), unlike the lenient OpenAI request shapes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from guard.audit import Feedback


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: str = Field(description="The answer's request id: its x-request-id header, or the id after `chatcmpl-`.")
    thumbs: bool | None = Field(None, description="true: thumbs up; false: thumbs down. Not with rating.")
    rating: int | None = Field(None, description="1 (worst) to 5 (best). Not with thumbs.")
    preferred_index: int | None = Field(None, description="best_of_n: the index of the candidate (in the trace) the user prefers.")
    correction: str | None = Field(None, description="The answer the user would have wanted.")
    comment: str = Field("", description="Free text, at most 2,000 characters.")
    choice: int = Field(0, description="Which choice of a request with n > 1.")

    def to_feedback(self) -> Feedback:
        return Feedback(**self.model_dump())
