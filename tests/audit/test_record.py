"""What a record keeps of a request: decisions always, text only as far as the policy's audit.text allows."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from guard.audit import AuditRecord, record_of, text_hash
from guard.audit.record import CandidateRecord
from guard.types import CandidateAnswer, Message, TraceEntry
from tests.audit.made import finished


def test_text_none_keeps_no_prompt_or_answer_but_every_decision():
    record = record_of(finished(outcome="refused", rule="bomb", prompt="a pipe bomb", text="none"))
    assert record.input is None and record.choices[0].output is None
    assert record.refusal.rule == "bomb" and record.choices[0].steps[0].detail == {"matched": "bomb"}
    assert "pipe bomb" not in record.to_json().decode()


def test_text_hashed_keeps_sha256_of_prompt_and_answer():
    record = record_of(finished(prompt="hello there", answer="hi!", text="hashed"))
    assert record.input == hashlib.sha256(b"hello there").hexdigest()
    assert record.choices[0].output == hashlib.sha256(b"hi!").hexdigest()


def test_a_conversation_is_hashed_as_compact_json_of_its_messages():
    chat = dataclasses.replace(finished(text="hashed"), input=[Message("system", "Be nice."), Message("user", "héllo")])
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "héllo"}]
    compact = json.dumps(messages, separators=(",", ":"), ensure_ascii=False)
    assert record_of(chat).input == hashlib.sha256(compact.encode()).hexdigest() == text_hash(messages)


def test_text_full_keeps_prompt_messages_and_answer():
    assert record_of(finished(prompt="hello there", answer="hi!", text="full")).input == "hello there"
    chat = dataclasses.replace(finished(text="full"), input=[Message("user", "hey")])
    record = record_of(chat)
    assert record.input == [{"role": "user", "content": "hey"}] and record.choices[0].output == "hi!"


def test_hidden_reasoning_in_the_trace_is_model_text_and_follows_the_setting():
    def with_reasoning(text: str) -> AuditRecord:
        request = finished(text=text)
        request.results[0].trace.append(
            TraceEntry("answer", "answer", "after", 0.0, {"reasoning": "secret steps", "marker_missing": False})
        )
        return record_of(request)

    assert with_reasoning("none").choices[0].steps[-1].detail == {"reasoning": None, "marker_missing": False}
    assert with_reasoning("hashed").choices[0].steps[-1].detail["reasoning"] == text_hash("secret steps")
    assert with_reasoning("full").choices[0].steps[-1].detail["reasoning"] == "secret steps"


def test_grounding_checks_unsupported_sentences_are_answer_text_and_follow_the_setting():
    def flagged(text: str) -> dict:
        request = finished(text=text)
        detail = {"grounded": False, "unsupported": [{"sentence": 0, "best_score": 0.1}], "unsupported_text": "It flies."}
        request.results[0].trace.append(TraceEntry("grounding_check", "grounding_check", "after", 0.0, detail))
        return record_of(request).choices[0].steps[-1].detail

    assert flagged("none")["unsupported_text"] is None and flagged("none")["unsupported"] == [{"sentence": 0, "best_score": 0.1}]
    assert flagged("hashed")["unsupported_text"] == text_hash("It flies.")
    assert flagged("full")["unsupported_text"] == "It flies."


def test_a_failed_request_records_its_status_and_message_without_answers():
    record = record_of(finished(outcome="error", status="DEADLINE_EXCEEDED"))
    assert (record.outcome, record.status, record.error, record.choices) == ("error", "DEADLINE_EXCEEDED", "upstream down", ())
    assert record.refusal is None and record.prompt_tokens == 0


def test_fail_open_checks_are_counted():
    assert record_of(finished(fail_open=True)).fail_opens == 1
    assert record_of(finished()).fail_opens == 0


def test_json_round_trip_gives_the_same_record():
    record = record_of(finished(outcome="refused", rule="bomb", text="full", fail_open=True))
    assert AuditRecord.from_json(record.to_json()) == record


def test_detail_json_cannot_hold_is_kept_as_text_not_an_error():
    request = finished()
    request.results[0].trace[0].detail.update(score=np.float32(0.5), odd=object())
    detail = AuditRecord.from_json(record_of(request).to_json()).choices[0].steps[0].detail
    assert detail["score"] == 0.5 and detail["odd"].startswith("<object object")


def best_of_n(text: str):
    """A best_of_n request: three candidates, the last refused by an output filter."""
    request = finished(text=text, answer="Paris.")
    result = request.results[0]
    result.candidates = (
        CandidateAnswer(0, "Lyon?", 0.1), CandidateAnswer(1, "Paris.", 0.9), CandidateAnswer(2, "classified plans", None, "outputs")
    )
    entries = [{"index": 0, "text": "Lyon?", "score": 0.1}, {"index": 1, "text": "Paris.", "score": 0.9},
               {"index": 2, "refused_by": "outputs", "refused_rule": "secret"}]
    result.trace.append(TraceEntry("best_of_n", "best_of_n", "select", 0.01, {"candidates": entries, "chosen": 1}))
    return record_of(request)


def test_best_of_n_candidates_are_kept_once_with_their_scores_refused_ones_included():
    record = best_of_n("full")
    assert record.choices[0].candidates == (
        CandidateRecord(0, "Lyon?", 0.1, ""), CandidateRecord(1, "Paris.", 0.9, ""), CandidateRecord(2, "classified plans", None, "outputs")
    )
    # The trace's copies of the texts (what a client with a trace sees) are not stored twice.
    assert [set(e) for e in record.choices[0].steps[-1].detail["candidates"]] == [
        {"index", "score"}, {"index", "score"}, {"index", "refused_by", "refused_rule"}
    ]
    assert AuditRecord.from_json(record.to_json()) == record


def test_best_of_n_candidates_texts_follow_the_text_setting():
    assert [c.text for c in best_of_n("hashed").choices[0].candidates] == [text_hash(t) for t in ("Lyon?", "Paris.", "classified plans")]
    kept_nothing = best_of_n("none")
    assert [(c.index, c.text, c.score) for c in kept_nothing.choices[0].candidates] == [(0, None, 0.1), (1, None, 0.9), (2, None, None)]
    assert "Lyon" not in kept_nothing.to_json().decode() and "classified" not in kept_nothing.to_json().decode()


def test_records_written_before_candidates_were_recorded_still_read():
    data = json.loads(record_of(finished()).to_json())
    del data["choices"][0]["candidates"]
    assert AuditRecord.from_dict(data).choices[0].candidates == ()
