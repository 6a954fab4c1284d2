"""The OpenAI API's request shapes (as much as guard serves), and its request -> guard.types conversion.

Unknown fields are accepted and ignored, as OpenAI's SDKs expect of compatible servers (so are the
sampling penalties, which guard's policies do not carry yet); fields whose meaning guard cannot honour
(tools, logprobs, echo, ...) are rejected with a 400 that names them, rather than silently answering
something else.
"""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field

from guard import limits
from guard.errors import Invalid, InvalidArgument, NotFound
from guard.policy.loader import format_path
from guard.types import GenerateInput, Message

POLICY_PREFIX = "guard/"
# OpenAI's newer "developer" role is the system role of older models.
ROLE_ALIASES = {"developer": "system"}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Common(_Lenient):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def _unsupported(self, names: dict[str, Any]) -> None:
        for name, harmless in names.items():
            value = getattr(self, name, None) if name in type(self).model_fields else (self.model_extra or {}).get(name)
            if value not in (None, harmless, [], {}):
                raise InvalidArgument(f"{name}: not supported by guard (got {value!r})")

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def _input(self, *, prompt: str | None, messages: list[Message] | None, max_tokens: int | None) -> GenerateInput:
        sampling = limits.sampling(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop_strings(),
        )
        metadata = limits.metadata(dict(self.metadata or {}))
        if self.user:
            # OpenAI's end-user id, kept with the request's metadata (logs) under its own name.
            if len(self.user) > limits.MAX_METADATA_CHARS:
                raise InvalidArgument(f"user: at most {limits.MAX_METADATA_CHARS} characters (got {len(self.user)})")
            metadata["user"] = self.user
        return GenerateInput(prompt=prompt, messages=messages, sampling=sampling, metadata=metadata)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None

    def to_input(self) -> GenerateInput:
        self._unsupported(
            {"tools": None, "functions": None, "tool_choice": "none", "function_call": "none", "logprobs": False,
             "top_logprobs": None, "audio": None, "prediction": None}
        )
        response_format = (self.model_extra or {}).get("response_format")
        if response_format is not None and not isinstance(response_format, dict):
            raise InvalidArgument(f"response_format: must be an object such as {{\"type\": \"text\"}} (got {response_format!r})")
        if response_format and response_format.get("type", "text") != "text":
            raise InvalidArgument(f"response_format: only type 'text' is supported by guard (got {response_format.get('type')!r})")
        if not self.messages:
            raise InvalidArgument(Invalid.MESSAGES_EMPTY.format(field="messages"))
        limits.message_count(len(self.messages))
        messages = [_message(index, message) for index, message in enumerate(self.messages)]
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        try:
            return self._input(prompt=None, messages=messages, max_tokens=max_tokens)
        except InvalidArgument as exc:
            raise InvalidArgument(str(exc).replace("max_tokens:", f"{field}:", 1)) from None


class CompletionRequest(_Common):
    prompt: str | list[str]

    def to_input(self) -> GenerateInput:
        self._unsupported({"echo": False, "suffix": None, "logprobs": None, "best_of": 1, "logit_bias": None})
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidArgument(f"prompt: guard takes one prompt per request (got a list of {len(self.prompt)})")
            prompt = self.prompt[0]
        else:
            prompt = self.prompt
        if not prompt:
            raise InvalidArgument(Invalid.PROMPT_EMPTY.format(field="prompt"))
        return self._input(prompt=limits.text(prompt, "prompt"), messages=None, max_tokens=self.max_tokens)


def _message(index: int, message: ChatMessage) -> Message:
    role = ROLE_ALIASES.get(message.role, message.role)
    if role not in limits.ROLES:
        allowed = ", ".join((*limits.ROLES, *ROLE_ALIASES))
        raise InvalidArgument(Invalid.MESSAGE_ROLE.format(field="messages", index=index, allowed=allowed, value=message.role))
    content = message.content
    if content is None:
        raise InvalidArgument(f"messages[{index}].content: must be text (tool calls are not supported by guard)")
    if isinstance(content, list):
        texts = []
        for part_index, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise InvalidArgument(
                    f"messages[{index}].content[{part_index}].type: only text parts are supported by guard (got {part.type!r})"
                )
            texts.append(part.text)
        content = "\n".join(texts)
    return Message(role, limits.text(content, f"messages[{index}].content"))  # type: ignore[arg-type]


def field_path(model: type[BaseModel], loc: tuple) -> str:
    """A pydantic error location as the client's field path: `messages[0].content[1].text`.

    pydantic puts the member it tried into the location of a union-typed field ("prompt", "list[str]", 0);
    the client never wrote those labels, so they are left out by walking the model's annotations.
    """
    path: list = []
    annotation: Any = model
    for part in loc:
        members = [m for m in _members(annotation) if m is not type(None)]
        owner = next((m for m in members if _is_model(m) and part in m.model_fields), None)
        listed = next((m for m in members if get_origin(m) is list), None)
        mapped = next((m for m in members if get_origin(m) is dict), None)
        if owner is not None:
            path.append(part)
            annotation = owner.model_fields[part].annotation
        elif isinstance(part, int) and listed is not None:
            path.append(part)
            annotation = get_args(listed)[0]
        elif len(members) > 1:
            # A union member's label: follow that member (by the label's leading type name).
            annotation = next((m for m in members if str(part).startswith(getattr(get_origin(m) or m, "__name__", "?"))), Any)
        elif mapped is not None:
            path.append(part)
            annotation = get_args(mapped)[1]
        else:
            path.append(part)
            annotation = Any
    return format_path(tuple(path))


def _members(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        return [member for arg in get_args(annotation) for member in _members(arg)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def requested_policy(model: str, header: str | None, policy_names: set[str], model_names: set[str]) -> str:
    """The policy a request names: `model` ("guard/<policy>" or a policy's name), else the
    X-Guard-Policy header; "" lets the tenant's or server's default apply.

    A `model` that is neither a policy nor a model guard serves is an unknown model (404), as
    OpenAI answers; "guard/<name>" always names a policy, so a typo cannot fall back silently.
    """
    known = ", ".join(sorted(f"{POLICY_PREFIX}{name}" for name in policy_names))
    if model.startswith(POLICY_PREFIX):
        if model.removeprefix(POLICY_PREFIX) not in policy_names:
            raise NotFound(f"model: unknown policy {model!r} (policies: {known})")
        return model.removeprefix(POLICY_PREFIX)
    if model in policy_names:
        return model
    if model and model not in model_names:
        raise NotFound(f"model: unknown model or policy {model!r} (policies: {known})")
    return header or ""


def finish_reason(guard_reason: str) -> str:
    return "content_filter" if guard_reason == "refused" else guard_reason
