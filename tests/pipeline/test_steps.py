"""Each built-in step's hooks on a request context (no upstream needed)."""

from __future__ import annotations

import pytest
import yaml

from guard.pipeline import chain_of_thought, filters, system_prompt  # noqa: F401 - registers the steps
from guard.pipeline.base import Candidate, Context, StepDeps, step_class
from guard.policy.model import Policy
from guard.types import GenerateInput, Message, Sampling


def make_policy(steps_yaml: str) -> Policy:
    return Policy.model_validate({"name": "t", "refusal": "No.", "steps": yaml.safe_load(steps_yaml)})


def build(policy: Policy, index: int = 0):
    config = policy.steps[index]
    return step_class(config.type)(config, StepDeps(upstream=None))  # type: ignore[arg-type]


def chat_context(policy: Policy, *messages: tuple[str, str]) -> Context:
    msgs = [Message(role, content) for role, content in messages]
    return Context(
        request=GenerateInput(messages=msgs), policy=policy, policy_version="v", model="m", sampling=Sampling(), messages=msgs
    )


def prompt_context(policy: Policy, prompt: str) -> Context:
    return Context(
        request=GenerateInput(prompt=prompt), policy=policy, policy_version="v", model="m", sampling=Sampling(), prompt=prompt
    )


@pytest.mark.parametrize(
    ("mode", "expected_system"),
    [
        ("prepend", "OPERATOR\n\nclient rules"),
        ("append", "client rules\n\nOPERATOR"),
        ("replace", "OPERATOR"),
    ],
)
async def test_system_prompt_modes_merge_into_one_leading_system_message(mode, expected_system):
    policy = make_policy(f"[{{type: system_prompt, content: OPERATOR, mode: {mode}}}]")
    ctx = chat_context(policy, ("user", "hi"), ("system", "client rules"), ("assistant", "yo"), ("user", "again"))
    await build(policy).before(ctx)
    assert ctx.messages[0] == Message("system", expected_system)
    assert [m.role for m in ctx.messages] == ["system", "user", "assistant", "user"]
    assert sum(m.role == "system" for m in ctx.messages) == 1


async def test_system_prompt_inserted_when_client_sent_none():
    policy = make_policy("[{type: system_prompt, content: OPERATOR, mode: append}]")
    ctx = chat_context(policy, ("user", "hi"))
    await build(policy).before(ctx)
    assert ctx.messages == [Message("system", "OPERATOR"), Message("user", "hi")]


async def test_system_prompt_on_raw_prompt():
    policy = make_policy("[{type: system_prompt, content: OPERATOR}]")
    ctx = prompt_context(policy, "Once upon a time")
    await build(policy).before(ctx)
    assert ctx.prompt == "OPERATOR\n\nOnce upon a time"


async def test_request_object_is_not_mutated_by_steps():
    policy = make_policy("[{type: system_prompt, content: OPERATOR, mode: replace}]")
    ctx = chat_context(policy, ("system", "mine"), ("user", "hi"))
    original = list(ctx.request.messages)
    await build(policy).before(ctx)
    assert ctx.request.messages == original


async def test_chain_of_thought_adds_instruction_with_marker():
    policy = make_policy("[{type: chain_of_thought, marker: 'ANSWER:'}]")
    ctx = chat_context(policy, ("user", "2+2?"))
    await build(policy).before(ctx)
    assert ctx.messages[0].role == "system"
    assert "'ANSWER:'" in ctx.messages[0].content
    assert "{marker}" not in ctx.messages[0].content


async def test_chain_of_thought_returns_only_the_final_answer_and_keeps_reasoning():
    policy = make_policy("[{type: chain_of_thought, marker: 'ANSWER:'}]")
    ctx = chat_context(policy, ("user", "2+2?"))
    candidate = Candidate(0, "Two and two. I might write ANSWER: later.\nSo it is four.\nANSWER: 4\n", "raw")
    await build(policy).after(ctx, candidate)
    assert candidate.text == "4"
    assert candidate.notes["reasoning"].startswith("Two and two.")
    assert candidate.refusal is None


@pytest.mark.parametrize(("on_missing", "refused"), [("return_all", False), ("refuse", True)])
async def test_chain_of_thought_missing_marker(on_missing, refused):
    policy = make_policy(f"[{{type: chain_of_thought, on_missing_marker: {on_missing}}}]")
    ctx = chat_context(policy, ("user", "q"))
    candidate = Candidate(0, "just rambling", "just rambling")
    await build(policy).after(ctx, candidate)
    assert candidate.notes["marker_missing"] is True
    assert (candidate.refusal is not None) == refused
    if refused:
        assert candidate.refusal.text == "No."
        assert candidate.refusal.stage == "output"
    else:
        assert candidate.text == "just rambling"


FILTER = """
- type: input_filter
  refusal: Blocked by input filter.
  rules:
    - {name: weapons, keywords: [pipe bomb, nerve agent]}
    - {name: card, regex: ['\\b(?:\\d[ -]?){13,16}\\b']}
"""


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("how do I build a PIPE  BOMB", "weapons"),
        ("Nerve agent synthesis?", "weapons"),
        ("my card is 4111 1111 1111 1111", "card"),
        ("a pipe bombastic review", None),  # word boundary
        ("what is the capital of France?", None),
    ],
)
async def test_input_filter_rules(text, rule):
    policy = make_policy(FILTER)
    ctx = chat_context(policy, ("user", text))
    await build(policy).before(ctx)
    if rule is None:
        assert ctx.refusal is None
    else:
        assert ctx.refusal is not None
        assert (ctx.refusal.stage, ctx.refusal.rule, ctx.refusal.text) == ("input", rule, "Blocked by input filter.")


@pytest.mark.parametrize("role", ["system", "user", "assistant"])
async def test_input_filter_reads_every_client_role_by_default(role):
    # A client system message or an assistant prefill is client text like any other.
    policy = make_policy(FILTER)
    ctx = chat_context(policy, (role, "explain a pipe bomb step by step"), ("user", "go on"))
    await build(policy).before(ctx)
    assert ctx.refusal is not None and ctx.refusal.rule == "weapons"


async def test_input_filter_roles_can_be_narrowed():
    policy = make_policy(FILTER.replace("refusal: Blocked", "roles: [user]\n  refusal: Blocked"))
    ctx = chat_context(policy, ("system", "never explain a pipe bomb"), ("user", "hello"))
    await build(policy).before(ctx)
    assert ctx.refusal is None


async def test_output_filter_refuses_candidate_with_policy_refusal():
    policy = make_policy("[{type: output_filter, rules: [{name: secret, keywords: [hunter2]}]}]")
    ctx = chat_context(policy, ("user", "q"))
    step = build(policy)
    bad, good = Candidate(0, "the password is Hunter2.", "x"), Candidate(1, "fine", "y")
    await step.after(ctx, bad)
    await step.after(ctx, good)
    assert bad.refusal is not None and bad.refusal.rule == "secret" and bad.refusal.text == "No."
    assert good.refusal is None


@pytest.mark.parametrize(("on_error", "refused"), [("refuse", True), ("allow", False)])
async def test_filter_fail_mode(on_error, refused):
    policy = make_policy(f"[{{type: input_filter, on_error: {on_error}, rules: [{{name: r, keywords: [x]}}]}}]")
    step = build(policy)

    def broken(views):
        raise RuntimeError("matcher crashed")

    step.patterns.first_match = broken
    ctx = chat_context(policy, ("user", "anything"))
    await step.before(ctx)
    assert (ctx.refusal is not None) == refused
