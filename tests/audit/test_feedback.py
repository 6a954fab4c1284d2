"""Feedback validation: what needs no record, and what a request's record allows. Messages start with the field."""

from __future__ import annotations

import grpc
import pytest

from guard.audit import Feedback, record_of
from guard.audit.feedback import check_against, check_fields
from guard.errors import GuardError
from guard.types import CandidateAnswer, TraceEntry
from tests.audit.made import finished


def refused_with(feedback: Feedback, check=check_fields, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(GuardError) as raised:
        check(feedback, *args)
    return raised.value.code, str(raised.value)


@pytest.mark.parametrize(
    ("feedback", "field"),
    [
        (Feedback("", thumbs=True), "request_id"),
        (Feedback("has space", thumbs=True), "request_id"),
        (Feedback("r", thumbs=True, rating=5), "rating"),
        (Feedback("r", rating=0), "rating"),
        (Feedback("r", rating=6), "rating"),
        (Feedback("r", preferred_index=-1), "preferred_index"),
        (Feedback("r", thumbs=True, choice=-1), "choice"),
        (Feedback("r", correction="  "), "correction"),
        (Feedback("r", thumbs=True, comment="x" * 2001), "comment"),
        (Feedback("r", comment="only words"), "rating"),
        (Feedback("r"), "rating"),
    ],
)
def test_malformed_feedback_is_invalid_argument_naming_the_field(feedback: Feedback, field: str):
    code, message = refused_with(feedback)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    "feedback",
    [Feedback("r", thumbs=False), Feedback("r", rating=1), Feedback("r", preferred_index=0), Feedback("r", correction="Better.")],
)
def test_a_rating_a_preferred_candidate_or_a_correction_each_suffice(feedback: Feedback):
    check_fields(feedback)


def best_of_n_record(text: str = "full"):
    request = finished(text=text, answer="Paris.")
    result = request.results[0]
    result.candidates = (CandidateAnswer(0, "Lyon?", 0.1), CandidateAnswer(1, "Paris.", 0.9), CandidateAnswer(2, "no", None, "outputs"))
    result.trace.append(TraceEntry("best_of_n", "best_of_n", "select", 0.0, {"chosen": 1}))
    return record_of(request)


def test_feedback_on_an_answer_that_kept_its_text_names_that_answer():
    record = best_of_n_record()
    assert check_against(Feedback("r-1", preferred_index=0), record) is record.choices[0]
    assert check_against(Feedback("r-1", thumbs=True), record_of(finished(text="full"))).output == "hi!"


@pytest.mark.parametrize("mode", ["none", "hashed"])
def test_a_policy_that_keeps_no_text_cannot_take_feedback(mode: str):
    code, message = refused_with(Feedback("r-1", thumbs=True), check_against, record_of(finished(text=mode)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert message == (
        f"request_id: feedback cannot become preferences because policy 'safe' keeps no text (audit: {{text: {mode}}}); "
        "its policy needs audit: {text: full}"
    )


def test_a_failed_request_has_no_answer_to_rate():
    code, message = refused_with(Feedback("r-1", thumbs=True), check_against, record_of(finished(outcome="error", text="full")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "failed (UNAVAILABLE)" in message


@pytest.mark.parametrize(
    ("feedback", "record", "says"),
    [
        (Feedback("r-1", preferred_index=3), best_of_n_record(), "preferred_index: must be between 0 and 2"),
        (Feedback("r-1", preferred_index=2), best_of_n_record(), "preferred_index: candidate 2 was refused"),
        (Feedback("r-1", preferred_index=0), record_of(finished(text="full")), "preferred_index: request 'r-1' was not best_of_n"),
        (Feedback("r-1", thumbs=True, choice=1), record_of(finished(text="full")), "choice: request 'r-1' has 1 answer,"),
    ],
)
def test_an_index_the_record_does_not_have_is_invalid_argument(feedback: Feedback, record, says: str):
    code, message = refused_with(feedback, check_against, record)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith(says)


def test_kinds_name_what_a_feedback_carries():
    assert Feedback("r", thumbs=True, comment="nice").kinds == ["thumbs_up", "comment"]
    assert Feedback("r", rating=2, preferred_index=0, correction="x").kinds == ["rating", "preferred", "correction"]
    assert Feedback("r", thumbs=False).kinds == ["thumbs_down"]
