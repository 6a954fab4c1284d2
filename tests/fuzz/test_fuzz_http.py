"""Property-based tests of the OpenAI HTTP door: random bodies for /v1/chat/completions and /v1/completions.

Whatever a client sends (any JSON, a valid request with some fields mutated, bytes that are not
JSON), guard answers 200 in OpenAI's shape (a JSON completion, or server-sent events ending in
`data: [DONE]`) or 400/403/404/429 with OpenAI's error body, whose message starts with the field at
fault (or "body:"); never a 500, never an error that is not JSON.

Mutated requests carry their own oracle: the unmutated request is valid, so a rejection must name a
field that was mutated (or one that a mutated field changes the meaning of: `n` is checked against
the policy that `model` selects).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import httpx
import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from guard.http.openai_types import ChatCompletionRequest, CompletionRequest
from tests.fuzz.conftest import FIELD_PATH, FORBIDDEN_INPUT, POLICY_NAMES, UPSTREAM_TEXT, examples

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ERROR_STATUS = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
FINISH_REASONS = ("stop", "length", "content_filter")
SERVED_MODEL = "fault-model"
MAX_N = {"limited": 2}  # limits.max_n of the fuzz policies; 1 elsewhere
MAX_METADATA_CHARS = 256  # README / guard.limits: metadata keys and values (and so `user`)

# Paths into an OpenAI request that name a field (pydantic's union member labels, such as the
# "str" of `stop: str | list[str]`, are not fields).
REQUEST_FIELD = re.compile(
    r"^(body|[a-z_][a-z0-9_]*|(stop|prompt)\[\d+\]|stream_options\.include_usage"
    r"|messages\[\d+\](\.(role|content)(\[\d+\](\.(type|text))?)?)?)$"
)
REQUIRED = {CHAT: {"model", "messages"}, COMPLETIONS: {"model", "prompt"}}


# Strategies

lone_surrogates = st.sampled_from(["\ud800", "a\udfff", "\udbff\udc00"])  # the last is a valid pair
texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "\u2028", "\ufeff", "é", "👍🏽", "fine", "guard/default", "null", "[DONE]"]),
    st.builds(lambda a, b: f"{a} {FORBIDDEN_INPUT} {b}", st.text(max_size=6), st.text(max_size=6)),
)
numbers = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 16, 17, 32768, 32769, 2**31, 2**63, -(2**63) - 1, 10**30, 10**400]),
    st.integers(),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, 2.0, 2.0000001, 1e-300, 1e308, math.nan, math.inf, -math.inf]),
    st.floats(),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts, lone_surrogates)
json_values = st.recursive(
    scalars, lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(texts, children, max_size=4)), max_leaves=12
)


def encode(body: Any) -> bytes:
    """JSON as a client might send it: NaN and Infinity as the bare tokens, lone surrogates escaped."""
    return json.dumps(body, allow_nan=True).encode()


policy_models = st.sampled_from(POLICY_NAMES).flatmap(lambda name: st.sampled_from([f"guard/{name}", name]))
models = st.one_of(policy_models, st.sampled_from([SERVED_MODEL, ""]))
roles = st.sampled_from(["system", "user", "assistant", "developer"])
text_parts = st.lists(st.builds(lambda text: {"type": "text", "text": text}, st.text(max_size=10)), min_size=1, max_size=3)
valid_messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=20), text_parts)}), min_size=1, max_size=3
)
valid_stop = st.one_of(st.text(min_size=1, max_size=5), st.lists(st.text(min_size=1, max_size=5), max_size=8))


@st.composite
def valid_bodies(draw, path: str) -> dict[str, Any]:
    """A request guard must answer with a 200 (no header picks another policy)."""
    model = draw(models)
    policy = model.removeprefix("guard/") if model not in (SERVED_MODEL, "") else "default"
    body: dict[str, Any] = {"model": model}
    if path == CHAT:
        body["messages"] = draw(valid_messages)
    else:
        body["prompt"] = draw(st.one_of(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20).map(lambda t: [t])))
    optional = {
        "max_tokens": st.integers(1, 32768),
        "temperature": st.floats(0.0, 2.0),
        "top_p": st.floats(0.0, 1.0, exclude_min=True),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": valid_stop,
        "n": st.integers(1, MAX_N.get(policy, 1)),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        "user": st.text(max_size=10),
        "frequency_penalty": st.floats(-2, 2),
        "logprobs": st.just(False) if path == CHAT else st.none(),
    }
    if path == CHAT:
        optional["max_completion_tokens"] = st.integers(1, 32768)
        optional["response_format"] = st.just({"type": "text"})
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=6)):
        body[name] = draw(optional[name])
    return body


def wild_messages() -> st.SearchStrategy:
    part = st.one_of(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url", "input_audio", "", "TEXT"])}, optional={"text": json_values}
        ),
        json_values,
    )
    content = st.one_of(texts, st.none(), st.lists(part, max_size=3), json_values, st.just("x" * 1_000_001))
    message = st.one_of(
        st.fixed_dictionaries(
            {"role": st.one_of(st.sampled_from(["user", "system", "tool", "function", "User", "", "developer"]), json_values)},
            optional={"content": content, "name": texts, "tool_calls": json_values},
        ),
        json_values,
    )
    return st.one_of(
        st.lists(message, max_size=4),
        json_values,
        st.sampled_from([1024, 1025]).map(lambda n: [{"role": "user", "content": "m"}] * n),
    )


# Values worth trying for each field, besides any JSON at all.
TARGETED: dict[str, st.SearchStrategy] = {
    "model": st.one_of(texts, st.sampled_from(["guard/unknown", "guard/", "guard/Default", "gpt-4o", SERVED_MODEL])),
    "messages": wild_messages(),
    "prompt": st.one_of(
        st.sampled_from(["", [], [""], ["a", "b"], [1], None]), st.lists(texts, max_size=2), st.just("x" * 1_000_001)
    ),
    "max_tokens": numbers,
    "max_completion_tokens": numbers,
    "temperature": numbers,
    "top_p": numbers,
    "seed": numbers,
    "n": numbers,
    "stop": st.one_of(st.sampled_from(["", [], [""], ["a"] * 9, [1], "x"]), st.lists(texts, max_size=10)),
    "stream": st.sampled_from([True, False, "true", "yes", "false", "0", 1, 0, 1.0, None, "maybe"]),
    "stream_options": st.one_of(
        st.fixed_dictionaries({}, optional={"include_usage": st.sampled_from([True, False, "x", None, 2])}), json_values
    ),
    "metadata": st.one_of(
        st.dictionaries(texts, st.one_of(texts, json_values), max_size=3),
        st.integers(31, 34).map(lambda n: {f"k{i}": "v" for i in range(n)}),
        st.sampled_from([{"k": "v" * 257}, {"k" * 257: "v"}]),
    ),
    "user": st.one_of(texts, st.sampled_from(["u" * 256, "u" * 257])),
    "response_format": st.one_of(
        st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {}, {"type": None}]),
        json_values,
    ),
    "tools": json_values,
    "tool_choice": json_values,
    "functions": json_values,
    "function_call": json_values,
    "logprobs": json_values,
    "top_logprobs": json_values,
    "audio": json_values,
    "prediction": json_values,
    "echo": json_values,
    "suffix": json_values,
    "best_of": numbers,
    "logit_bias": json_values,
}
DELETE = object()
FIELD_NAMES = sorted(TARGETED)


@st.composite
def mutated_bodies(draw, path: str) -> tuple[dict[str, Any], set[str]]:
    """(a valid body with some fields replaced, added or deleted, the names of those fields)."""
    body = draw(valid_bodies(path))
    names = st.one_of(st.sampled_from(sorted(TARGETED)), st.sampled_from(sorted(REQUIRED[path])), st.text(max_size=8))
    mutated = set()
    for name in draw(st.lists(names, unique=True, min_size=1, max_size=3)):
        value = draw(st.one_of(TARGETED.get(name, json_values), json_values, st.just(DELETE)))
        if value is DELETE:
            body.pop(name, None)
        else:
            body[name] = value
        mutated.add(name)
    return body, mutated


headers_strategy = st.fixed_dictionaries(
    {},
    optional={
        "x-guard-policy": st.one_of(
            st.sampled_from(POLICY_NAMES), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=8)
        ),
        "x-guard-trace": st.sampled_from(["1", "true", "0", "no", ""]),
    },
)


# Checks


def check_error(response: httpx.Response, body: Any, allowed_fields: set[str]) -> str:
    """An OpenAI error body naming a field; returns the field path. `allowed_fields`: the top-level
    fields the rejection may name ("body" always may be)."""
    assert response.status_code in ERROR_STATUS, f"HTTP {response.status_code}: {response.text[:500]!r}"
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    message = error["message"]
    assert isinstance(message, str) and isinstance(error["code"], str), error
    assert error["type"] == ERROR_STATUS[response.status_code], error
    path = field_path(message, body)
    assert path is not None, f"HTTP {response.status_code}: the message does not start with a field path: {message!r}"
    param = path if response.status_code == 400 else None
    assert error["param"] == param, error
    assert REQUEST_FIELD.match(path) or path.startswith("metadata."), f"{path!r} is not a request field: {message!r}"
    top = re.split(r"[.\[]", path, maxsplit=1)[0]
    assert top in allowed_fields | {"body"}, (
        f"HTTP {response.status_code} names {path!r}, not one of {sorted(allowed_fields)}: {message!r}"
    )
    event(f"rejected: {response.status_code} {top}")
    return path


def field_path(message: str, body: Any) -> str | None:
    """The field a message starts with: a FIELD_PATH, or `metadata.<key>` for a key of the request's."""
    metadata = body.get("metadata") if isinstance(body, dict) else None
    if isinstance(metadata, dict):
        for key in metadata:
            if message.startswith(f"metadata.{key}: "):
                return f"metadata.{key}"
    match = FIELD_PATH.match(message)
    return match["path"] if match else None


def check_answer(response: httpx.Response, path: str, body: dict[str, Any]) -> None:
    assert response.status_code == 200, response.text[:500]
    # How many choices, streamed or not: as the request's own model reads them (pydantic's lax
    # coercions: "2" and 2.0 are 2, "yes" is true).
    request = (ChatCompletionRequest if path == CHAT else CompletionRequest).model_validate_json(encode(body))
    n = request.n
    policy = response.headers["x-guard-policy"]
    assert response.headers["x-guard-policy-version"], response.headers
    chat = path == CHAT
    if response.headers["content-type"].startswith("text/event-stream"):
        assert request.stream, body
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        chunks = stream_chunks(response.text, include_usage)
        finals = [choice for chunk in chunks for choice in chunk["choices"] if choice["finish_reason"] is not None]
        assert sorted(choice["index"] for choice in finals) == list(range(n)), chunks
        assert all(chunk["model"] == f"guard/{policy}" for chunk in chunks), chunks
        pieces = [(c["index"], (c["delta"].get("content") or "") if chat else c["text"]) for chunk in chunks for c in chunk["choices"]]
        texts = ["".join(text for index, text in pieces if index == i) for i in range(n)]
        reasons = [choice["finish_reason"] for choice in sorted(finals, key=lambda c: c["index"])]
        event("answered: stream")
    else:
        assert response.headers["content-type"].startswith("application/json") and not request.stream, body
        answer = response.json()
        assert answer["object"] == ("chat.completion" if chat else "text_completion"), answer
        assert answer["model"] == f"guard/{policy}" and answer["guard"]["policy"] == policy, answer
        assert [choice["index"] for choice in answer["choices"]] == list(range(n)), answer
        texts = [choice["message"]["content"] if chat else choice["text"] for choice in answer["choices"]]
        reasons = [choice["finish_reason"] for choice in answer["choices"]]
        event("answered: json")
    assert all(reason in FINISH_REASONS for reason in reasons), reasons
    if policy == "filtered":
        assert set(reasons) == {"content_filter"} and all(t.endswith("I can't help with that request.") for t in texts), texts
    else:
        assert set(reasons) == {"stop"} and texts == [UPSTREAM_TEXT] * n, (texts, reasons)


def stream_chunks(text: str, include_usage: bool) -> list[dict[str, Any]]:
    """The JSON chunks of an event stream, which must end with `data: [DONE]` and carry no error;
    with `include_usage`, the last chunk before it has no choices and the usage."""
    assert text.endswith("data: [DONE]\n\n"), text[-500:]
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("error" not in chunk and isinstance(chunk["choices"], list) for chunk in chunks), chunks
    usage = [chunk for chunk in chunks if not chunk["choices"]]
    if include_usage:
        assert len(usage) == 1 and chunks[-1] is usage[0] and usage[0]["usage"]["total_tokens"] >= 0, chunks
    else:
        assert usage == [], chunks
    return [chunk for chunk in chunks if chunk["choices"]]


# The properties

FUZZ_HTTP = examples(150)


@pytest.fixture(scope="module")
async def client(guard_app):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{guard_app.http_port}", timeout=10) as http:
        yield http


async def post(client: httpx.AsyncClient, path: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return await client.post(path, content=content, headers={"content-type": "application/json", **(headers or {})})


@FUZZ_HTTP
@given(
    path=st.sampled_from([CHAT, COMPLETIONS]),
    body=st.one_of(json_values, st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), texts), json_values, max_size=6)),
)
async def test_any_json_is_answered_or_rejected_naming_a_field(client, path: str, body: Any) -> None:
    response = await post(client, path, encode(body))
    if response.status_code == 200:
        check_answer(response, path, body)
        return
    fields = (set(body) if isinstance(body, dict) else set()) | REQUIRED[path]
    check_error(response, body, {f for f in fields if isinstance(f, str)})


@FUZZ_HTTP
@given(path=st.sampled_from([CHAT, COMPLETIONS]), data=st.data(), headers=headers_strategy)
async def test_mutated_requests_are_answered_or_rejected_naming_a_mutated_field(client, path: str, data, headers) -> None:
    body, mutated = data.draw(mutated_bodies(path))
    if "x-guard-policy" in headers:
        mutated.add("policy")  # the header is the request's policy when `model` names none
    if mutated & {"model", "policy"}:
        mutated.add("n")  # checked against the policy's limits.max_n
    response = await post(client, path, encode(body), headers)
    if response.status_code == 200:
        check_answer(response, path, body)
        return
    field = check_error(response, body, mutated)
    if response.status_code == 404:
        assert field in ("model", "policy"), response.text


@FUZZ_HTTP
@given(path=st.sampled_from([CHAT, COMPLETIONS]), data=st.data())
async def test_valid_requests_are_answered(client, path: str, data) -> None:
    body = data.draw(valid_bodies(path))
    response = await post(client, path, encode(body))
    check_answer(response, path, body)
    model = body["model"]
    assert response.headers["x-guard-policy"] == (model.removeprefix("guard/") if model not in (SERVED_MODEL, "") else "default")


@FUZZ_HTTP
@given(
    path=st.sampled_from([CHAT, COMPLETIONS]),
    content=st.one_of(
        st.binary(max_size=64),
        st.text(max_size=32).map(str.encode),
        st.builds(lambda body, cut: encode(body)[:cut], json_values, st.integers(0, 40)),
        st.sampled_from([b"", b"{", b"\xff\xfe{}", b'{"model": "default", "prompt": "x"', b"NaN", b"\xef\xbb\xbf{}"]),
    ),
)
async def test_bytes_that_are_not_json_are_rejected_naming_the_body(client, path: str, content: bytes) -> None:
    try:
        body = json.loads(content)
    except ValueError:
        response = await post(client, path, content)
        assert check_error(response, None, {"body"}) == "body", response.text
    else:
        # It happens to be JSON: the JSON property applies.
        response = await post(client, path, content)
        if response.status_code != 200:
            fields = (set(body) if isinstance(body, dict) else set()) | REQUIRED[path]
            check_error(response, body, {f for f in fields if isinstance(f, str)})


# The bugs these properties found, one minimal example each (numbered as above).

CHAT_HI = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
PROMPT_HI = {"model": "default", "prompt": "hi"}


async def test_a_response_format_that_is_not_an_object_is_rejected_naming_it(client) -> None:
    response = await post(client, CHAT, encode({**CHAT_HI, "response_format": "json_object"}))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format", response.text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (COMPLETIONS, {**PROMPT_HI, "prompt": [1]}, "prompt"),
        (COMPLETIONS, {**PROMPT_HI, "stop": 5}, "stop"),
        (CHAT, {**CHAT_HI, "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content"),
    ],
    ids=["prompt", "stop", "content"],
)
async def test_a_wrong_typed_union_field_is_named_by_its_own_path(client, path: str, body: dict, field: str) -> None:
    response = await post(client, path, encode(body))
    assert response.status_code == 400, response.text
    param = response.json()["error"]["param"]
    assert param.startswith(field) and REQUEST_FIELD.match(param), response.text


async def test_a_too_long_user_is_rejected_naming_user(client) -> None:
    response = await post(client, COMPLETIONS, encode({**PROMPT_HI, "user": "u" * 257}))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "user", response.text


async def test_param_is_the_whole_path_when_a_metadata_key_has_a_colon(client) -> None:
    response = await post(client, COMPLETIONS, encode({**PROMPT_HI, "metadata": {"a:b": 1}}))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "metadata.a:b", response.text
