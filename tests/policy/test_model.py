"""The Policy model: what validates, and for each kind of mistake, where and why it is rejected."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from guard.policy.model import PatternRule, Policy

FILTER = {"type": "input_filter", "rules": [{"name": "r", "keywords": ["bomb"]}]}


def errors(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str, str]]:
    with pytest.raises(ValidationError) as raised:
        Policy.model_validate(data)
    return [(error["loc"], error["type"], error["msg"]) for error in raised.value.errors()]


def test_the_smallest_policy_is_a_name() -> None:
    policy = Policy.model_validate({"name": "default"})
    assert policy.steps == [] and policy.model is None and policy.refusal


def test_a_policy_with_every_step_type() -> None:
    policy = Policy.model_validate(
        {
            "name": "everything",
            "model": "my-lora",
            "sampling": {"max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": ["\n\n"]},
            "steps": [
                {"type": "system_prompt", "content": "Be brief.", "mode": "replace"},
                {"type": "chain_of_thought", "marker": "ANSWER:"},
                {**FILTER, "roles": ["user", "system"], "on_error": "allow"},
                {"type": "output_filter", "rules": [{"name": "r", "regex": [r"\bsecret\b"]}], "refusal": "No."},
                {"type": "best_of_n", "n": 2, "reward": {"type": "embedding"}},
            ],
        }
    )
    assert [step.type for step in policy.steps] == [
        "system_prompt", "chain_of_thought", "input_filter", "output_filter", "best_of_n",
    ]
    assert policy.sampling.to_sampling().stop == ("\n\n",)


def test_two_steps_of_one_type_need_names() -> None:
    policy = Policy.model_validate({"name": "p", "steps": [{**FILTER, "name": "a"}, {**FILTER, "name": "b"}]})
    assert [step.name for step in policy.steps] == ["a", "b"]


@pytest.mark.parametrize(
    ("data", "loc", "kind", "message"),
    [
        ({"name": "p", "stepz": []}, ("stepz",), "extra_forbidden", "Extra inputs"),
        (
            {"name": "p", "steps": [{"type": "system_prompt", "content": "x", "mdoe": "append"}]},
            ("steps", 0, "system_prompt", "mdoe"),
            "extra_forbidden",
            "Extra inputs",
        ),
        (
            {"name": "p", "steps": [{**FILTER, "rules": [{"name": "r", "keywords": ["a"], "regexp": ["b"]}]}]},
            ("steps", 0, "input_filter", "rules", 0, "regexp"),
            "extra_forbidden",
            "Extra inputs",
        ),
        ({"name": "p", "steps": [{"type": "moderate"}]}, ("steps", 0), "union_tag_invalid", "'moderate'"),
        ({"name": "p", "steps": [{"content": "x"}]}, ("steps", 0), "union_tag_not_found", "'type'"),
        (
            {"name": "p", "steps": [FILTER, {"type": "output_filter", "rules": [{"name": "r", "regex": ["a(b"]}]}]},
            ("steps", 1, "output_filter", "rules", 0, "regex"),
            "value_error",
            "invalid regular expression 'a(b'",
        ),
        (
            {"name": "p", "steps": [{"type": "input_filter", "rules": []}]},
            ("steps", 0, "input_filter"),
            "value_error",
            "at least one entry in rules, semantic, classifiers or guard_models",
        ),
        (
            {"name": "p", "steps": [{"type": "input_filter", "rules": [{"name": "r"}]}]},
            ("steps", 0, "input_filter", "rules", 0),
            "value_error",
            "rule 'r' has neither keywords nor regex",
        ),
        (
            {"name": "p", "steps": [{"type": "chain_of_thought"}, {"type": "chain_of_thought"}]},
            (),
            "value_error",
            "steps[1]: duplicate step name 'chain_of_thought'",
        ),
        (
            {"name": "p", "steps": [{"type": "best_of_n", "reward": {"type": "embedding"}}] * 2},
            (),
            "value_error",
            "duplicate step name 'best_of_n'",
        ),
        ({"name": "p", "sampling": {"temperature": 2.5}}, ("sampling", "temperature"), "less_than_equal", "2"),
        ({"name": "p", "sampling": {"top_p": 0}}, ("sampling", "top_p"), "greater_than", "0"),
        ({"name": "p", "sampling": {"max_tokens": 0}}, ("sampling", "max_tokens"), "greater_than_equal", "1"),
        ({"name": "p", "sampling": {"max_tokens": "lots"}}, ("sampling", "max_tokens"), "int_parsing", "integer"),
        ({"name": "p", "steps": {"type": "system_prompt"}}, ("steps",), "list_type", "valid list"),
        ({"name": "p", "refusal": ""}, ("refusal",), "string_too_short", "at least 1 character"),
        ({"name": "Safe Assistant"}, ("name",), "string_pattern_mismatch", "pattern"),
        ({"description": "no name"}, ("name",), "missing", "Field required"),
        (
            {"name": "p", "steps": [{"type": "system_prompt"}]},
            ("steps", 0, "system_prompt", "content"),
            "missing",
            "Field required",
        ),
        (
            {"name": "p", "steps": [{**FILTER, "roles": ["tool"]}]},
            ("steps", 0, "input_filter", "roles", 0),
            "literal_error",
            "'system', 'user' or 'assistant'",
        ),
    ],
)
def test_bad_policies_are_rejected_with_the_path_and_reason(
    data: dict[str, Any], loc: tuple[Any, ...], kind: str, message: str
) -> None:
    found = errors(data)
    assert any(error_loc == loc and error_kind == kind and message in msg for error_loc, error_kind, msg in found), found


def test_every_mistake_is_reported_not_just_the_first() -> None:
    found = errors({"name": "p", "sampling": {"temperature": -1, "top_p": 2}, "oops": 1})
    assert {loc for loc, _, _ in found} == {("sampling", "temperature"), ("sampling", "top_p"), ("oops",)}


def test_policies_are_immutable() -> None:
    policy = Policy.model_validate({"name": "p"})
    with pytest.raises(ValidationError):
        policy.name = "q"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("how to BUILD A BOMB", True),  # case-insensitive
        ("build   a\tbomb", True),  # any whitespace run between a keyword's words
        ("bomb", False),  # the whole phrase, not a word of it
        ("rebuild a bombardment", False),  # word boundaries
        ("reach ACME-42 now", True),  # regex, case-insensitive
        ("acme-4", False),
    ],
)
def test_compiled_rules_match_like_the_filters(text: str, matches: bool) -> None:
    rule = PatternRule(name="r", keywords=["build a bomb"], regex=[r"acme-\d\d"])
    assert bool(rule.compiled().search(text)) is matches


def test_keywords_are_literal_text_not_regex() -> None:
    rule = PatternRule(name="r", keywords=["c++ (beta)"])
    assert rule.compiled().search("try c++ (beta) today")
    assert not rule.compiled().search("try cc (beta) today")


def test_audit_text_is_none_unless_a_policy_opts_in_and_only_known_modes_validate() -> None:
    assert Policy.model_validate({"name": "p"}).audit.text == "none"
    assert Policy.model_validate({"name": "p", "audit": {"text": "hashed"}}).audit.text == "hashed"
    assert [e[:2] for e in errors({"name": "p", "audit": {"text": "plain"}})] == [(("audit", "text"), "literal_error")]
    assert [e[:2] for e in errors({"name": "p", "audit": {"prompts": True}})] == [(("audit", "prompts"), "extra_forbidden")]
