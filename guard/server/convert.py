"""protobuf <-> guard.types, with request validation (messages name the field)."""

from __future__ import annotations

from google.protobuf import struct_pb2
from google.protobuf.json_format import ParseDict

from guard import limits
from guard.audit import Feedback
from guard.errors import Invalid, InvalidArgument
from guard.service import Admission, jsonable, visible_refusal
from guard.types import GenerateInput, GenerateResult, Message, Sampling
from guard.v1 import guard_pb2 as pb


def _messages(chat: pb.ChatMessages) -> list[Message]:
    if not chat.messages:
        raise InvalidArgument(Invalid.MESSAGES_EMPTY.format(field="messages"))
    limits.message_count(len(chat.messages))
    messages = []
    for index, message in enumerate(chat.messages):
        if message.role not in limits.ROLES:
            allowed = ", ".join(limits.ROLES)
            raise InvalidArgument(Invalid.MESSAGE_ROLE.format(field="messages", index=index, allowed=allowed, value=message.role))
        messages.append(Message(message.role, limits.text(message.content, f"messages[{index}].content")))
    return messages


def input_of(request: pb.GenerateRequest | pb.ScoreRequest) -> tuple[str | None, list[Message] | None]:
    which = request.WhichOneof("input")
    if which == "prompt":
        if not request.prompt:
            raise InvalidArgument(Invalid.PROMPT_EMPTY.format(field="prompt"))
        return limits.text(request.prompt, "prompt"), None
    if which == "messages":
        return None, _messages(request.messages)
    raise InvalidArgument(Invalid.INPUT_MISSING.value)


def sampling_of(params: pb.SamplingParams) -> Sampling:
    def given(name: str):
        return getattr(params, name) if params.HasField(name) else None

    return limits.sampling(
        max_tokens=given("max_tokens"),
        temperature=given("temperature"),
        top_p=given("top_p"),
        seed=given("seed"),
        stop=params.stop,
        prefix="sampling.",
    )


def generate_input(request: pb.GenerateRequest, request_id: str | None = None) -> GenerateInput:
    """`request_id`: the call's x-request-id metadata (None: guard makes one)."""
    prompt, messages = input_of(request)
    metadata = limits.metadata(dict(request.metadata))
    return GenerateInput(
        prompt=prompt,
        messages=messages,
        policy=request.policy,
        sampling=sampling_of(request.sampling),
        metadata=metadata,
        include_trace=request.include_trace,
        request_id=limits.request_id(request_id),
    )


def feedback_of(request: pb.FeedbackRequest) -> Feedback:
    """Unchecked: GuardService.feedback validates it as it validates the HTTP door's."""
    verdict = request.WhichOneof("verdict")
    return Feedback(
        request_id=request.request_id,
        thumbs=request.thumbs if verdict == "thumbs" else None,
        rating=request.rating if verdict == "rating" else None,
        preferred_index=request.preferred_index if request.HasField("preferred_index") else None,
        correction=request.correction if request.HasField("correction") else None,
        comment=request.comment,
        choice=request.choice,
    )


def _struct(detail: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    ParseDict(jsonable(detail), out)
    return out


def fill_result(
    message: pb.GenerateResponse | pb.GenerateStreamResponse,
    result: GenerateResult,
    admission: Admission,
) -> None:
    """The result as the caller may see it: refusal details and the trace only where its tenant may."""
    message.finish_reason = result.finish_reason
    message.policy = result.policy
    message.policy_version = result.policy_version
    message.usage.prompt_tokens = result.usage.prompt_tokens
    message.usage.completion_tokens = result.usage.completion_tokens
    for source in result.sources:
        message.sources.add(
            number=source.number, id=source.id, document=source.document, heading=source.heading, text=source.text,
            score=source.score, cited=source.cited,
        )
    if result.refusal is not None:
        refusal = visible_refusal(admission, result.refusal)
        message.refusal.refused = True
        message.refusal.stage = refusal.stage
        message.refusal.step = refusal.step
        message.refusal.rule = refusal.rule
        message.refusal.reason = refusal.reason
    if admission.with_trace:
        trace = message.trace
        trace.upstream_seconds = result.upstream_seconds
        trace.total_seconds = result.total_seconds
        trace.upstream_url = result.upstream_url
        trace.upstream_model = result.upstream_model
        for entry in result.trace:
            trace.steps.add(
                step=entry.step,
                type=entry.type,
                phase=entry.phase,
                duration_seconds=entry.duration_seconds,
                detail=_struct(entry.detail),
            )
