"""The OpenAI request shapes: conversion to GenerateInput, fields guard rejects, and which policy a request names."""

from __future__ import annotations

from typing import Any

import pytest

from guard.errors import InvalidArgument, NotFound
from guard.http.openai_types import ChatCompletionRequest, CompletionRequest, requested_policy
from guard.types import Message, Sampling


def chat(**fields: Any) -> ChatCompletionRequest:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return ChatCompletionRequest.model_validate({"model": "m", **fields})


def completion(**fields: Any) -> CompletionRequest:
    fields.setdefault("prompt", "Once upon")
    return CompletionRequest.model_validate({"model": "m", **fields})


def invalid(request: ChatCompletionRequest | CompletionRequest) -> str:
    with pytest.raises(InvalidArgument) as raised:
        request.to_input()
    return str(raised.value)


# Chat completions


def test_a_chat_request_becomes_messages_and_sampling() -> None:
    converted = chat(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "Hello"}],
        max_tokens=12, temperature=0.3, top_p=0.9, seed=4, stop="END",
    ).to_input()
    assert converted.prompt is None and converted.is_chat
    assert converted.messages == [Message("system", "Be brief."), Message("user", "hi"), Message("assistant", "Hello")]
    assert converted.sampling == Sampling(max_tokens=12, temperature=0.3, top_p=0.9, seed=4, stop=("END",))
    assert converted.metadata == {} and converted.policy == ""


def test_the_developer_role_is_the_system_role() -> None:
    converted = chat(messages=[{"role": "developer", "content": "Rules."}, {"role": "user", "content": "hi"}]).to_input()
    assert converted.messages[0] == Message("system", "Rules.")


@pytest.mark.parametrize("role", ["tool", "function", "User", ""])
def test_other_roles_are_rejected_naming_the_message(role: str) -> None:
    message = invalid(chat(messages=[{"role": "user", "content": "hi"}, {"role": role, "content": "x"}]))
    assert message.startswith("messages[1].role:") and repr(role) in message


def test_text_parts_are_joined_with_newlines() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert chat(messages=[{"role": "user", "content": parts}]).to_input().messages == [Message("user", "first\nsecond")]


def test_an_image_part_is_rejected_naming_it() -> None:
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    message = invalid(chat(messages=[{"role": "user", "content": parts}]))
    assert message.startswith("messages[0].content[1].type:") and "'image_url'" in message


def test_content_none_is_rejected() -> None:
    message = invalid(chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]))
    assert message.startswith("messages[1].content:")
    assert invalid(chat(messages=[{"role": "assistant"}])).startswith("messages[0].content:")


def test_no_messages_is_rejected() -> None:
    assert invalid(chat(messages=[])).startswith("messages:")


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=10, max_completion_tokens=20).to_input().sampling.max_tokens == 20
    assert chat(max_tokens=10).to_input().sampling.max_tokens == 10
    assert chat(max_completion_tokens=20).to_input().sampling.max_tokens == 20
    # The ignored max_tokens is not checked.
    assert chat(max_tokens=0, max_completion_tokens=20).to_input().sampling.max_tokens == 20


def test_an_invalid_max_tokens_is_named_as_the_client_named_it() -> None:
    assert invalid(chat(max_completion_tokens=0)).startswith("max_completion_tokens:")
    assert invalid(chat(max_tokens=1, max_completion_tokens=10**6)).startswith("max_completion_tokens:")
    assert invalid(chat(max_tokens=0)).startswith("max_tokens:")
    assert invalid(chat(max_tokens=10**6)).startswith("max_tokens:")


def test_other_sampling_errors_keep_their_names() -> None:
    assert invalid(chat(temperature=3)).startswith("temperature:")
    assert invalid(chat(max_completion_tokens=5, temperature=-1)).startswith("temperature:")
    assert invalid(chat(top_p=0)).startswith("top_p:")
    assert invalid(chat(stop=["a", ""])).startswith("stop:")


def test_stop_as_a_string_or_a_list() -> None:
    assert chat(stop="END").to_input().sampling.stop == ("END",)
    assert chat(stop=["a", "b"]).to_input().sampling.stop == ("a", "b")
    assert chat(stop=None).to_input().sampling.stop == ()
    assert chat(stop=[]).to_input().sampling.stop == ()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("functions", [{"name": "f"}]),
        ("tool_choice", "auto"),
        ("function_call", "auto"),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("audio", {"voice": "x"}),
        ("prediction", {"type": "content", "content": "x"}),
    ],
)
def test_unsupported_chat_fields_are_rejected_naming_them(field: str, value: Any) -> None:
    message = invalid(chat(**{field: value}))
    assert message.startswith(f"{field}: not supported by guard")


def test_harmless_values_of_unsupported_fields_are_accepted() -> None:
    converted = chat(tool_choice="none", logprobs=False, tools=[], function_call="none", top_logprobs=None).to_input()
    assert converted.messages == [Message("user", "hi")]


def test_response_format_other_than_text_is_rejected() -> None:
    message = invalid(chat(response_format={"type": "json_object"}))
    assert message.startswith("response_format:") and "'json_object'" in message
    assert invalid(chat(response_format={"type": "json_schema", "json_schema": {}})).startswith("response_format:")
    assert chat(response_format={"type": "text"}).to_input().is_chat
    assert chat(response_format=None).to_input().is_chat


def test_unknown_fields_are_ignored() -> None:
    converted = chat(frobnicate=True, parallel_tool_calls=None, service_tier="auto").to_input()
    assert converted.messages == [Message("user", "hi")] and converted.sampling == Sampling()


def test_user_goes_into_metadata() -> None:
    assert chat(user="alice").to_input().metadata == {"user": "alice"}
    assert chat(user="alice", metadata={"team": "a"}).to_input().metadata == {"team": "a", "user": "alice"}
    assert chat(metadata={"team": "a"}).to_input().metadata == {"team": "a"}


def test_too_much_metadata_is_rejected() -> None:
    assert invalid(chat(metadata={"k": "v" * 300})).startswith("metadata:")


# Completions


def test_a_completion_request_becomes_a_prompt() -> None:
    converted = completion(prompt="Once upon", max_tokens=7, stop=["\n"], user="bob").to_input()
    assert converted.prompt == "Once upon" and converted.messages is None and not converted.is_chat
    assert converted.sampling == Sampling(max_tokens=7, stop=("\n",))
    assert converted.metadata == {"user": "bob"}


def test_a_list_of_one_prompt_is_accepted_and_of_two_rejected() -> None:
    assert completion(prompt=["only"]).to_input().prompt == "only"
    message = invalid(completion(prompt=["a", "b"]))
    assert message.startswith("prompt:") and "2" in message
    assert invalid(completion(prompt=[])).startswith("prompt:")


@pytest.mark.parametrize("prompt", ["", [""]])
def test_an_empty_prompt_is_rejected(prompt: Any) -> None:
    assert invalid(completion(prompt=prompt)).startswith("prompt:")


@pytest.mark.parametrize(
    ("field", "value"), [("echo", True), ("suffix", "end"), ("logprobs", 2), ("best_of", 3), ("logit_bias", {"50256": -100})]
)
def test_unsupported_completion_fields_are_rejected_naming_them(field: str, value: Any) -> None:
    assert invalid(completion(**{field: value})).startswith(f"{field}: not supported by guard")


def test_harmless_completion_fields_are_accepted() -> None:
    assert completion(echo=False, best_of=1, suffix=None, logprobs=None).to_input().prompt == "Once upon"


def test_a_completions_max_tokens_is_checked() -> None:
    assert invalid(completion(max_tokens=0)).startswith("max_tokens:")
    assert invalid(completion(temperature=3)).startswith("temperature:")


# Which policy a request names

POLICIES = {"safe", "cot"}
MODELS = {"llama-8b"}


def test_guard_prefix_names_a_policy() -> None:
    assert requested_policy("guard/safe", None, POLICIES, MODELS) == "safe"
    assert requested_policy("guard/cot", "safe", POLICIES, MODELS) == "cot"


def test_guard_prefix_with_an_unknown_policy_is_not_found_rather_than_a_fallback() -> None:
    for model in ("guard/nope", "guard/llama-8b"):
        with pytest.raises(NotFound) as raised:
            requested_policy(model, "cot", POLICIES, MODELS)
        assert str(raised.value).startswith("model:") and repr(model) in str(raised.value)


def test_a_bare_policy_name_names_it() -> None:
    assert requested_policy("safe", "cot", POLICIES, MODELS) == "safe"


def test_a_served_model_name_defers_to_the_header() -> None:
    assert requested_policy("llama-8b", "cot", POLICIES, MODELS) == "cot"
    assert requested_policy("llama-8b", None, POLICIES, MODELS) == ""
    assert requested_policy("llama-8b", "", POLICIES, MODELS) == ""


def test_an_unknown_bare_name_is_not_found() -> None:
    with pytest.raises(NotFound) as raised:
        requested_policy("gpt-4o", "cot", POLICIES, MODELS)
    message = str(raised.value)
    assert message.startswith("model:") and "'gpt-4o'" in message and "guard/cot" in message and "guard/safe" in message
