"""The Feedback RPC through the real gRPC door, with GuardClient as a labelling UI would use it: best_of_n
candidates in the trace (never a refused one's text), feedback validated against the audit record, tenants kept
apart by their API keys, and feedback sent the moment the answer arrives."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import generate_latest

from guard.alignment.export import export_preferences
from guard.alignment.preferences import PreferencePair
from guard.audit import AuditQuery
from guard.client import Candidate, GuardClient
from guard.metrics import REGISTRY
from guard.types import Message
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc
from tests.support.feedback_app import (
    ACME_KEY,
    CANDIDATES,
    CHOSEN,
    REFUSED,
    SCORES,
    ZETA_KEY,
    candidates_upstream,
    start_feedback_app,
)

QUESTION = [("user", "What is the capital of France?")]


@pytest.fixture
def upstream():
    with candidates_upstream() as upstream:
        yield upstream


@pytest.fixture
async def app(tmp_path, upstream):
    app = await start_feedback_app(tmp_path, upstream)
    yield app
    await app.stop(grace=1)


def client(app, key: str = ACME_KEY) -> GuardClient:
    return GuardClient(f"127.0.0.1:{app.port}", api_key=key)


async def call(function, *args, **kwargs):
    """A blocking GuardClient call off the event loop that serves guard."""
    return await asyncio.to_thread(function, *args, **kwargs)


async def refusal(function, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        await call(function, *args, **kwargs)
    return raised.value.code(), raised.value.details()


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_the_trace_shows_the_candidates_a_user_may_prefer_and_never_a_refused_one(app):
    with client(app) as guard:
        answer = await call(guard.generate, QUESTION, policy="bon", trace=True, request_id="see-1")
    assert answer.text == CANDIDATES[CHOSEN] and answer.request_id == "see-1"
    assert answer.candidates == [
        Candidate(0, CANDIDATES[0], SCORES[CANDIDATES[0]], refused=False, chosen=False),
        Candidate(1, CANDIDATES[1], SCORES[CANDIDATES[1]], refused=False, chosen=True),
        Candidate(2, None, None, refused=True, chosen=False),
    ]
    assert "classified plans" not in repr(answer)  # refused: not in the trace, not anywhere in the answer


async def test_the_audit_record_keeps_every_candidate_refused_ones_included(app):
    with client(app) as guard:
        await call(guard.generate, QUESTION, policy="bon", request_id="kept-1")
    await asyncio.to_thread(app.audit.flush)
    [record] = app.audit.query(AuditQuery(request_id="kept-1"))
    candidates = record.choices[0].candidates
    assert [(c.index, c.text, c.refused_by) for c in candidates] == [
        (0, CANDIDATES[0], ""), (1, CANDIDATES[1], ""), (REFUSED, CANDIDATES[REFUSED], "outputs")
    ]
    assert [c.score for c in candidates] == [SCORES[CANDIDATES[0]], SCORES[CANDIDATES[1]], None]


async def test_a_preferred_candidate_sent_right_after_the_answer_is_stored_and_counted(app):
    before = sample("guard_feedback_total", policy="bon", kind="preferred")
    with client(app) as guard:
        answer = await call(guard.generate, QUESTION, policy="bon", trace=True)
        # At once: the writer thread has not written the record yet (it lingers 0.25 s).
        preferred = next(c for c in answer.candidates if not c.chosen and not c.refused)
        receipt = await call(guard.feedback, answer.request_id, preferred_index=preferred.index, comment="shorter is not better")
    assert (receipt.request_id, receipt.policy, receipt.policy_version) == (answer.request_id, "bon", answer.policy_version)
    [(record, feedback)] = app.audit.query_with_feedback(AuditQuery(request_id=answer.request_id))
    assert [(f.preferred_index, f.comment, f.tenant) for f in feedback] == [(0, "shorter is not better", "acme")]
    assert sample("guard_feedback_total", policy="bon", kind="preferred") == before + 1
    assert "shorter is not better" not in generate_latest(REGISTRY).decode()
    # The pair is rebuilt from the candidates guard recorded: the preferred one over the other it showed.
    exported = export_preferences(app.audit, policy="bon")
    assert exported.pairs == [PreferencePair(tuple(Message(*m) for m in QUESTION), CANDIDATES[0], CANDIDATES[CHOSEN])]


async def test_feedback_on_a_stream_is_found_although_its_record_is_queued_after_the_last_message(app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = guard_pb2_grpc.GuardStub(channel)
        auth = (("authorization", f"Bearer {ACME_KEY}"),)
        request = pb.GenerateRequest(prompt="The capital of France is", policy="bon")
        messages = [m async for m in stub.GenerateStream(request, metadata=(*auth, ("x-request-id", "streamed")), timeout=10)]
        assert messages[-1].finish_reason == "stop"
        response = await stub.Feedback(pb.FeedbackRequest(request_id="streamed", thumbs=True), metadata=auth, timeout=10)
    assert response.policy == "bon"


async def test_ratings_are_counted_for_the_mean_by_policy(app):
    count, total = sample("guard_feedback_rating_count", policy="plain"), sample("guard_feedback_rating_sum", policy="plain")
    with client(app) as guard:
        for rating in (2, 5):
            answer = await call(guard.generate, QUESTION, policy="plain")
            await call(guard.feedback, answer.request_id, rating=rating)
        answer = await call(guard.generate, QUESTION, policy="plain")
        await call(guard.feedback, answer.request_id, thumbs=False, correction="Paris.")
    assert sample("guard_feedback_rating_count", policy="plain") == count + 2
    assert sample("guard_feedback_rating_sum", policy="plain") == total + 7
    assert sample("guard_feedback_total", policy="plain", kind="correction") >= 1


async def test_feedback_attaches_to_the_newest_request_with_a_repeated_id(app):
    with client(app) as guard:
        await call(guard.generate, QUESTION, policy="plain", request_id="again")
        await asyncio.to_thread(app.audit.flush)  # the older one is in the database...
        await call(guard.generate, QUESTION, policy="bon", request_id="again")  # ...the newer one still queued
        receipt = await call(guard.feedback, "again", thumbs=True)
    assert receipt.policy == "bon"
    found = [(record.policy, len(feedback)) for record, feedback in app.audit.query_with_feedback(AuditQuery(request_id="again"))]
    assert found == [("bon", 1), ("plain", 0)]


async def test_an_unknown_id_is_not_found_after_looking_twice(app):
    with client(app) as guard:
        code, message = await refusal(guard.feedback, "never-sent", thumbs=True)
    assert code == grpc.StatusCode.NOT_FOUND and message == "request_id: no request 'never-sent' of this caller in the audit log"


async def test_another_tenant_s_request_is_not_found_exactly_like_an_unknown_one(app):
    with client(app, ACME_KEY) as acme, client(app, ZETA_KEY) as zeta:
        await call(acme.generate, QUESTION, policy="bon", request_id="acme-only")
        code, message = await refusal(zeta.feedback, "acme-only", thumbs=False)
        assert code == grpc.StatusCode.NOT_FOUND and message == "request_id: no request 'acme-only' of this caller in the audit log"
        # The same id from zeta is zeta's own request: its feedback goes there, never to acme's.
        await call(zeta.generate, QUESTION, policy="plain", request_id="acme-only")
        assert (await call(zeta.feedback, "acme-only", thumbs=False)).policy == "plain"
    tenants = {record.tenant: [f.thumbs for f in feedback] for record, feedback in app.audit.query_with_feedback(AuditQuery())}
    assert tenants["acme"] == [] and tenants["zeta"] == [False]


async def test_feedback_needs_a_valid_key(app):
    with client(app, "gk_not-a-key") as stranger:
        code, _ = await refusal(stranger.feedback, "anything", thumbs=True)
    assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("policy", "feedback", "code", "starts"),
    [
        ("bon", {"preferred_index": 3}, grpc.StatusCode.INVALID_ARGUMENT, "preferred_index: must be between 0 and 2"),
        ("bon", {"preferred_index": REFUSED}, grpc.StatusCode.INVALID_ARGUMENT, "preferred_index: candidate 2 was refused"),
        ("plain", {"preferred_index": 0}, grpc.StatusCode.INVALID_ARGUMENT, "preferred_index: request 'v-1' was not best_of_n"),
        ("plain", {"rating": 7}, grpc.StatusCode.INVALID_ARGUMENT, "rating: must be between 1 and 5"),
        ("plain", {"comment": "just words"}, grpc.StatusCode.INVALID_ARGUMENT, "rating: give thumbs or a rating"),
        ("plain", {"thumbs": True, "choice": 1}, grpc.StatusCode.INVALID_ARGUMENT, "choice: request 'v-1' has 1 answer"),
        ("hashing", {"thumbs": True}, grpc.StatusCode.FAILED_PRECONDITION,
         "request_id: feedback cannot become preferences because policy 'hashing' keeps no text (audit: {text: hashed})"),
        ("default", {"thumbs": True}, grpc.StatusCode.FAILED_PRECONDITION,
         "request_id: feedback cannot become preferences because policy 'default' keeps no text (audit: {text: none})"),
    ],
)
async def test_feedback_the_record_does_not_allow_is_refused_naming_the_field(app, policy, feedback, code, starts):
    with client(app) as guard:
        await call(guard.generate, QUESTION, policy=policy, request_id="v-1")
        got, message = await refusal(guard.feedback, "v-1", **feedback)
    assert got == code and message.startswith(starts), message
    assert list(app.audit.query_with_feedback(AuditQuery(feedback=True))) == []


async def test_without_the_audit_log_feedback_says_how_to_turn_it_on(tmp_path, upstream):
    app = await start_feedback_app(tmp_path, upstream, audit=False)
    try:
        with client(app) as guard:
            answer = await call(guard.generate, QUESTION, policy="plain")
            code, message = await refusal(guard.feedback, answer.request_id, thumbs=True)
    finally:
        await app.stop(grace=1)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "--audit-db" in message
