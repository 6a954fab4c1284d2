"""POST /v1/feedback on the HTTP door: the gRPC Feedback RPC's semantics in OpenAI's error shapes. Answers come
from the official openai SDK; feedback (a route OpenAI does not have) is posted with httpx."""

from __future__ import annotations

import httpx
import pytest
from openai import AsyncOpenAI

from guard.audit import AuditQuery
from tests.support.feedback_app import ACME_KEY, CANDIDATES, CHOSEN, REFUSED, ZETA_KEY, candidates_upstream, start_feedback_app

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def upstream():
    with candidates_upstream() as upstream:
        yield upstream


@pytest.fixture
async def app(tmp_path, upstream):
    app = await start_feedback_app(tmp_path, upstream)
    yield app
    await app.stop(grace=1)


@pytest.fixture
async def openai(app):
    async with AsyncOpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key=ACME_KEY, max_retries=0) as client:
        yield client


@pytest.fixture
async def http(app):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
        yield client


def auth(key: str = ACME_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_a_chat_completion_s_trace_lists_candidates_and_feedback_names_one(app, openai, http):
    raw = await openai.chat.completions.with_raw_response.create(
        model="guard/bon", messages=QUESTION, extra_headers={"X-Guard-Trace": "1"}
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert completion.id == f"chatcmpl-{request_id}" and completion.choices[0].message.content == CANDIDATES[CHOSEN]
    [select] = [s for s in completion.choices[0].model_extra["guard"]["trace"]["steps"] if s["phase"] == "select"]
    shown = [(c["index"], c.get("text")) for c in select["detail"]["candidates"]]
    assert shown == [(0, CANDIDATES[0]), (1, CANDIDATES[1]), (REFUSED, None)]
    assert CANDIDATES[REFUSED] not in raw.http_response.text

    response = await http.post("/v1/feedback", json={"request_id": request_id, "preferred_index": 0, "thumbs": False}, headers=auth())
    assert response.status_code == 200
    version = app.store.get("bon").version
    assert response.json() == {"object": "feedback", "request_id": request_id, "policy": "bon", "policy_version": version}
    [(_, feedback)] = app.audit.query_with_feedback(AuditQuery(request_id=request_id))
    assert [(f.preferred_index, f.thumbs, f.tenant) for f in feedback] == [(0, False, "acme")]


async def test_feedback_on_one_choice_of_several(app, http):
    chat = {"model": "guard/plain", "messages": QUESTION, "n": 2}
    answer = await http.post("/v1/chat/completions", json=chat, headers={**auth(), "x-request-id": "two-choices"})
    assert answer.status_code == 200
    response = await http.post("/v1/feedback", json={"request_id": "two-choices", "rating": 4, "choice": 1}, headers=auth())
    assert response.status_code == 200
    response = await http.post("/v1/feedback", json={"request_id": "two-choices", "rating": 4, "choice": 2}, headers=auth())
    assert (response.status_code, response.json()["error"]["param"]) == (400, "choice")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"request_id": "x", "rating": 9}, "rating"),
        ({"request_id": "x", "rating": "5"}, "rating"),  # strict: a string is not a rating
        ({"request_id": "x", "prefered_index": 1}, "prefered_index"),  # a typo is an error, not ignored
        ({"thumbs": True}, "request_id"),
        ({"request_id": "x", "thumbs": True, "rating": 2}, "rating"),
    ],
)
async def test_a_malformed_body_is_a_400_naming_the_field(http, body, param):
    response = await http.post("/v1/feedback", json=body, headers=auth())
    error = response.json()["error"]
    assert (response.status_code, error["type"], error["param"]) == (400, "invalid_request_error", param), error


async def test_unknown_and_other_tenants_ids_are_404_alike(app, http):
    answer = await http.post(
        "/v1/chat/completions", json={"model": "guard/plain", "messages": QUESTION}, headers={**auth(ACME_KEY), "x-request-id": "mine"}
    )
    assert answer.status_code == 200
    theirs = await http.post("/v1/feedback", json={"request_id": "mine", "thumbs": True}, headers=auth(ZETA_KEY))
    unknown = await http.post("/v1/feedback", json={"request_id": "nobody", "thumbs": True}, headers=auth(ZETA_KEY))
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["message"].replace("'mine'", "ID") == unknown.json()["error"]["message"].replace("'nobody'", "ID")
    assert (await http.post("/v1/feedback", json={"request_id": "mine", "thumbs": True})).status_code == 401


async def test_a_policy_that_keeps_no_text_is_a_400_failed_precondition(http):
    answer = await http.post(
        "/v1/completions", json={"model": "guard/hashing", "prompt": "hi"}, headers={**auth(), "x-request-id": "hashed-1"}
    )
    assert answer.status_code == 200
    response = await http.post("/v1/feedback", json={"request_id": "hashed-1", "thumbs": True}, headers=auth())
    error = response.json()["error"]
    assert (response.status_code, error["code"]) == (400, "failed_precondition")
    assert "policy 'hashing' keeps no text" in error["message"]
