"""Property-based tests of the gRPC door: random Generate, GenerateStream and Score requests.

Whatever a client sends, guard answers OK (with a finish reason and the policy that answered) or
with one of the statuses a client can act on, INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED or
RESOURCE_EXHAUSTED, whose details start with the field at fault; never UNKNOWN or INTERNAL.

An independent oracle, written from the documented bounds (README, guard.limits), lists the fields
a request gets wrong: a request with none must be answered, and a rejection must name one of them.
"""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc
from tests.fuzz.conftest import FIELD_PATH, FORBIDDEN_INPUT, POLICY_NAMES, UPSTREAM_TEXT, examples

ACTIONABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length", "refused")
TIMEOUT = 10.0

# Documented bounds (README "gRPC API", guard/limits.py), restated here rather than imported.
MAX_TOKENS = 32768
MAX_STOP = 8
MAX_METADATA_ENTRIES = 32
MAX_METADATA_CHARS = 256
MAX_CANDIDATES = 256
MAX_MESSAGES = 1024
MAX_TEXT_CHARS = 1_000_000
LONGEST = MAX_METADATA_CHARS


# Strategies

SPECIAL_TEXT = ["", " ", "\x00", "\x1b[31m", "\r\n", "\u200b", "\ufeff", "é", "👍🏽", "forbidden", "BoMbS", "fine", "ƒ" * 300]
texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(SPECIAL_TEXT),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=8),  # control characters
    st.builds(lambda a, b: f"{a} {FORBIDDEN_INPUT} {b}", st.text(max_size=8), st.text(max_size=8)),
)


VALID_ROLES = st.sampled_from(ROLES)
WILD_ROLES = st.one_of(
    st.sampled_from(("developer", "tool", "function", "User", "", " user", "system\x00")), st.text(max_size=8)
)
uint32s = st.one_of(st.sampled_from([0, MAX_TOKENS + 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
int64s = st.one_of(st.sampled_from([0, -1, 2**63 - 1, -(2**63), 2**31]), st.integers(-(2**63), 2**63 - 1))
SPECIAL_FLOATS = [0.0, -0.0, 1.0, 2.0, 2.0000002, -1e-45, 1e-45, 3.4e38, math.nan, math.inf, -math.inf]
wild_floats = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(width=32))


class Fields:
    """Field strategies: `valid` draws only values within the documented bounds; otherwise a
    value is valid about three times in four, and anything (out of range, NaN, wrong role...) else."""

    def __init__(self, draw, valid: bool) -> None:
        self.draw, self.valid = draw, valid

    def __call__(self, valid: st.SearchStrategy, wild: st.SearchStrategy):
        return self.draw(valid if self.valid else st.one_of(valid, valid, valid, wild))

    def messages(self) -> list[pb.ChatMessage]:
        if not self.valid and self.draw(st.integers(0, 9)) == 0:
            # Rarely: the documented size bounds, just within and just beyond, or no message at all.
            return self.draw(
                st.one_of(
                    st.just([]),
                    st.sampled_from([MAX_MESSAGES, MAX_MESSAGES + 1]).map(lambda n: [pb.ChatMessage(role="user", content="m")] * n),
                    st.sampled_from([MAX_TEXT_CHARS, MAX_TEXT_CHARS + 1]).map(lambda n: [pb.ChatMessage(role="user", content="c" * n)]),
                )
            )
        count = self.draw(st.integers(1, 4))
        return [pb.ChatMessage(role=self(VALID_ROLES, WILD_ROLES), content=self.draw(texts)) for _ in range(count)]

    def prompt(self) -> str:
        wild = st.one_of(st.just(""), st.sampled_from([MAX_TEXT_CHARS, MAX_TEXT_CHARS + 1]).map(lambda n: "p" * n))
        return self(st.one_of(st.text(min_size=1, max_size=30), texts.filter(bool)), wild)

    def sampling(self) -> pb.SamplingParams:
        params = pb.SamplingParams(
            stop=self(
                st.lists(st.text(min_size=1, max_size=6), max_size=MAX_STOP),
                st.lists(st.one_of(st.text(max_size=6), st.just("")), max_size=MAX_STOP + 3),
            )
        )
        for name, valid, wild in (
            ("max_tokens", st.integers(1, MAX_TOKENS), uint32s),
            ("temperature", st.floats(0.0, 2.0, width=32), wild_floats),
            ("top_p", st.floats(0.0, 1.0, exclude_min=True, width=32), wild_floats),
            ("seed", int64s, int64s),
        ):
            if self.draw(st.booleans()):
                setattr(params, name, self(valid, wild))
        return params

    def metadata(self) -> dict[str, str]:
        return self(
            st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
            st.one_of(
                st.dictionaries(st.text(max_size=3), st.sampled_from(["", "x" * LONGEST, "x" * (LONGEST + 1)]), max_size=3),
                st.dictionaries(st.sampled_from(["k" * LONGEST, "k" * (LONGEST + 1)]), st.text(max_size=3), max_size=2),
                st.integers(MAX_METADATA_ENTRIES - 1, MAX_METADATA_ENTRIES + 2).map(lambda n: {f"key{i}": "v" for i in range(n)}),
            ),
        )

    def policy(self) -> str:
        return self(
            st.sampled_from(("", *POLICY_NAMES)),
            st.one_of(st.sampled_from(("unknown", "Default", "guard/default", "default ", "../default")), st.text(max_size=10)),
        )

    def fill_input(self, request):
        """The `input` oneof of a GenerateRequest or ScoreRequest: a prompt, messages, or (wild only) neither."""
        which = self(st.sampled_from(["prompt", "messages"]), st.just("neither"))
        if which == "prompt":
            request.prompt = self.prompt()
        elif which == "messages":
            request.messages.SetInParent()  # an empty ChatMessages is still "messages"
            request.messages.messages.extend(self.messages())
        return request


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    fields = Fields(draw, valid=draw(st.booleans()))
    request = pb.GenerateRequest(policy=fields.policy(), include_trace=draw(st.booleans()))
    if draw(st.booleans()):
        request.sampling.CopyFrom(fields.sampling())
    request.metadata.update(fields.metadata())
    return fields.fill_input(request)


@st.composite
def score_requests(draw) -> pb.ScoreRequest:
    fields = Fields(draw, valid=draw(st.booleans()))
    candidates = fields(
        st.lists(texts, min_size=1, max_size=4),
        st.one_of(st.just([]), st.integers(MAX_CANDIDATES - 1, MAX_CANDIDATES + 1).map(lambda n: ["c"] * n)),
    )
    request = pb.ScoreRequest(policy=fields.policy(), candidates=candidates)
    return fields.fill_input(request)


# The oracle


def input_faults(request: pb.GenerateRequest | pb.ScoreRequest) -> set[str]:
    which = request.WhichOneof("input")
    if which is None:
        return {"input"}
    if which == "prompt":
        return {"prompt"} if not 1 <= len(request.prompt) <= MAX_TEXT_CHARS else set()
    messages = request.messages.messages
    if not 1 <= len(messages) <= MAX_MESSAGES:
        return {"messages"}
    found = {f"messages[{i}].role" for i, m in enumerate(messages) if m.role not in ROLES}
    return found | {f"messages[{i}].content" for i, m in enumerate(messages) if len(m.content) > MAX_TEXT_CHARS}


def faults(request: pb.GenerateRequest) -> set[str]:
    """The fields this request gets wrong, per the documented bounds (values as sent: float32)."""
    found = input_faults(request)
    sampling = request.sampling
    if sampling.HasField("max_tokens") and not 1 <= sampling.max_tokens <= MAX_TOKENS:
        found.add("sampling.max_tokens")
    if sampling.HasField("temperature") and not 0.0 <= sampling.temperature <= 2.0:
        found.add("sampling.temperature")
    if sampling.HasField("top_p") and not 0.0 < sampling.top_p <= 1.0:
        found.add("sampling.top_p")
    if len(sampling.stop) > MAX_STOP or any(s == "" for s in sampling.stop):
        found.add("sampling.stop")
    entries = dict(request.metadata)
    if len(entries) > MAX_METADATA_ENTRIES or any(
        len(k) > MAX_METADATA_CHARS or len(v) > MAX_METADATA_CHARS for k, v in entries.items()
    ):
        found.add("metadata")
    return found


def check_rejection(error: grpc.aio.AioRpcError, faulty: set[str], policy_known: bool) -> None:
    code, details = error.code(), error.details() or ""
    event(f"rejected: {code.name}")
    assert code in ACTIONABLE, f"{code.name}: {details!r}"
    match = FIELD_PATH.match(details)
    assert match is not None, f"{code.name} details do not start with a field path: {details!r}"
    path = match["path"]
    if code == grpc.StatusCode.NOT_FOUND:
        assert path == "policy" and not policy_known, details
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details  # open access: no keys, tenants or rate limits
        assert path in faulty, f"names {path!r}, but the request's faults are {sorted(faulty)}: {details!r}"


def check_answer(request: pb.GenerateRequest, text: str, final: pb.GenerateResponse | pb.GenerateStreamResponse) -> None:
    event(f"answered: {final.finish_reason}")
    assert final.finish_reason in FINISH_REASONS, final
    assert final.policy == (request.policy or "default") and final.policy_version, final
    refused = final.refusal.refused
    assert refused == (final.finish_reason == "refused"), final
    if final.policy == "filtered":
        # Refused on input (the forbidden word) or on output (every answer ends in "fine").
        assert refused, final
        assert text.endswith("I can't help with that request."), text
    else:
        assert not refused and final.finish_reason == "stop" and text == UPSTREAM_TEXT, (text, final)
    assert final.HasField("trace") == request.include_trace, final


# The properties

FUZZ_GRPC = examples(200)


@pytest.fixture(scope="module")
async def stub(guard_app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guard_app.port}") as channel:
        yield guard_pb2_grpc.GuardStub(channel)


@FUZZ_GRPC
@given(request=generate_requests())
async def test_generate_answers_or_names_the_field_at_fault(stub, request: pb.GenerateRequest) -> None:
    faulty = faults(request)
    policy_known = request.policy in ("", *POLICY_NAMES)
    try:
        response = await stub.Generate(request, timeout=TIMEOUT)
    except grpc.aio.AioRpcError as error:
        check_rejection(error, faulty, policy_known)
        return
    assert not faulty and policy_known, f"answered a request with faults {sorted(faulty)}, policy {request.policy!r}"
    check_answer(request, response.text, response)


@FUZZ_GRPC
@given(request=generate_requests())
async def test_generate_stream_answers_or_names_the_field_at_fault(stub, request: pb.GenerateRequest) -> None:
    faulty = faults(request)
    policy_known = request.policy in ("", *POLICY_NAMES)
    messages: list[pb.GenerateStreamResponse] = []
    try:
        async for message in stub.GenerateStream(request, timeout=TIMEOUT):
            messages.append(message)
    except grpc.aio.AioRpcError as error:
        assert not messages, f"failed after {len(messages)} messages: {error.code().name} {error.details()!r}"
        check_rejection(error, faulty, policy_known)
        return
    assert not faulty and policy_known, f"answered a request with faults {sorted(faulty)}, policy {request.policy!r}"
    assert messages, "an OK stream with no messages"
    *deltas, final = messages
    assert all(not m.finish_reason and not m.policy for m in deltas), deltas
    check_answer(request, "".join(m.text for m in messages), final)


@FUZZ_GRPC
@given(request=score_requests())
async def test_score_names_the_field_at_fault(stub, request: pb.ScoreRequest) -> None:
    # None of the served policies has a best_of_n step, so every Score is a rejection.
    faulty = input_faults(request)
    if not request.candidates or len(request.candidates) > MAX_CANDIDATES:
        faulty.add("candidates")
    policy_known = request.policy in ("", *POLICY_NAMES)
    if policy_known:
        faulty.add("policy")  # "policy: policy 'x' has no best_of_n step"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Score(request, timeout=TIMEOUT)
    check_rejection(raised.value, faulty, policy_known)


# Worked examples: the properties' oracle agrees with the server on the documented messages.


async def test_examples_of_field_paths(stub) -> None:
    cases = [
        (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=7.0)), "sampling.temperature: must be >= 0.0 and <= 2.0"),
        (
            pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user"), pb.ChatMessage(role="tool")])),
            "messages[1].role:",
        ),
        (pb.GenerateRequest(prompt="hi", policy="nope"), "policy: unknown policy 'nope'"),
        (pb.GenerateRequest(), "input: set exactly one of prompt or messages"),
    ]
    for request, prefix in cases:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(request, timeout=TIMEOUT)
        assert raised.value.details().startswith(prefix), raised.value.details()
