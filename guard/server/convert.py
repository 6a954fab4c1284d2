"""protobuf <-> guard.types, with request validation (messages name the field)."""

from __future__ import annotations

from google.protobuf import struct_pb2
from google.protobuf.json_format import ParseDict

from guard.server.errors import Invalid, InvalidArgument
from guard.types import GenerateInput, GenerateResult, Message, Sampling
from guard.v1 import guard_pb2 as pb

MAX_TOKENS_LIMIT = 32768
ROLES = ("system", "user", "assistant")


def _messages(chat: pb.ChatMessages) -> list[Message]:
    if not chat.messages:
        raise InvalidArgument(Invalid.MESSAGES_EMPTY.value)
    messages = []
    for index, message in enumerate(chat.messages):
        if message.role not in ROLES:
            raise InvalidArgument(Invalid.MESSAGE_ROLE.format(index=index, value=message.role))
        messages.append(Message(message.role, message.content))
    return messages


def input_of(request: pb.GenerateRequest | pb.ScoreRequest) -> tuple[str | None, list[Message] | None]:
    which = request.WhichOneof("input")
    if which == "prompt":
        if not request.prompt:
            raise InvalidArgument(Invalid.PROMPT_EMPTY.value)
        return request.prompt, None
    if which == "messages":
        return None, _messages(request.messages)
    raise InvalidArgument(Invalid.INPUT_MISSING.value)


def sampling_of(params: pb.SamplingParams) -> Sampling:
    max_tokens = params.max_tokens if params.HasField("max_tokens") else None
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidArgument(Invalid.MAX_TOKENS.format(limit=MAX_TOKENS_LIMIT, value=max_tokens))
    temperature = params.temperature if params.HasField("temperature") else None
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise InvalidArgument(Invalid.TEMPERATURE.format(value=temperature))
    top_p = params.top_p if params.HasField("top_p") else None
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InvalidArgument(Invalid.TOP_P.format(value=top_p))
    stop = tuple(params.stop)
    if len(stop) > 8 or any(not s for s in stop):
        raise InvalidArgument(Invalid.STOP.format(value=list(stop)))
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=params.seed if params.HasField("seed") else None,
        stop=stop,
    )


def generate_input(request: pb.GenerateRequest) -> GenerateInput:
    prompt, messages = input_of(request)
    metadata = dict(request.metadata)
    if len(metadata) > 32 or any(len(k) > 256 or len(v) > 256 for k, v in metadata.items()):
        raise InvalidArgument(Invalid.METADATA.value)
    return GenerateInput(
        prompt=prompt,
        messages=messages,
        policy=request.policy,
        sampling=sampling_of(request.sampling),
        metadata=metadata,
        include_trace=request.include_trace,
    )


def _struct(detail: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    # Trace detail is free-form step output; anything not JSON-like is shown as its repr.
    ParseDict(_jsonable(detail), out)
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def fill_result(message: pb.GenerateResponse | pb.GenerateStreamResponse, result: GenerateResult, *, with_trace: bool) -> None:
    message.finish_reason = result.finish_reason
    message.policy = result.policy
    message.policy_version = result.policy_version
    message.usage.prompt_tokens = result.usage.prompt_tokens
    message.usage.completion_tokens = result.usage.completion_tokens
    if result.refusal is not None:
        message.refusal.refused = True
        message.refusal.stage = result.refusal.stage
        message.refusal.step = result.refusal.step
        message.refusal.rule = result.refusal.rule
        message.refusal.reason = result.refusal.reason
    if with_trace:
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
