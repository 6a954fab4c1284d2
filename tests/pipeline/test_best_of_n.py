"""The best_of_n step on request contexts, scoring with a real Reranker (the bundled embedding model).

The embedding reward is relevance of a reply to the user's question, so which
candidate should win is known without looking at numbers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from guard.pipeline import best_of_n  # noqa: F401 - registers the step
from guard.pipeline.base import Candidate, Context, StepDeps, step_class
from guard.policy.model import Policy
from guard.rerank import Reranker, RerankError
from guard.types import GenerateInput, Message, Refusal, Sampling

QUESTION = [Message("user", "What is the capital of France?")]
ON_TOPIC = "Paris is the capital of France."
OFF_TOPIC = "Bananas are rich in potassium and grow in warm places."


class Observer:
    def __init__(self) -> None:
        self.chosen_scores: list[tuple[str, float]] = []

    def scored(self, source: str, candidates: int, seconds: float) -> None:
        pass

    def batch(self, source: str, sequences: int) -> None:
        pass

    def chosen(self, policy: str, score: float) -> None:
        self.chosen_scores.append((policy, score))


@pytest.fixture(scope="module")
async def reranker() -> AsyncIterator[Reranker]:
    reranker = Reranker(device="cpu", observer=Observer())
    yield reranker
    await reranker.close()


def make(reranker: Reranker, **options: Any):
    step = {"type": "best_of_n", "n": 3, "temperature": 0.8, "top_p": 0.9, "reward": {"type": "embedding"}, **options}
    policy = Policy.model_validate({"name": "bon", "refusal": "No.", "steps": [step]})
    config = policy.steps[0]
    return policy, step_class(config.type)(config, StepDeps(upstream=None, reranker=reranker))  # type: ignore[arg-type]


def context(policy: Policy, *texts: str, sampling: Sampling = Sampling()) -> Context:
    ctx = Context(
        request=GenerateInput(messages=list(QUESTION), sampling=sampling),
        policy=policy,
        policy_version="v",
        model="m",
        sampling=sampling,
        messages=list(QUESTION),
    )
    ctx.candidates = [Candidate(index=i, text=t, raw_text=t) for i, t in enumerate(texts)]
    return ctx


def refuse(candidate: Candidate) -> None:
    candidate.refusal = Refusal("output", "output_filter", "paris", "matched rule 'paris'", "I can't help with that.")


async def test_before_asks_for_n_candidates_in_one_call(reranker: Reranker):
    policy, step = make(reranker, n=5)
    ctx = context(policy, sampling=Sampling(max_tokens=32, temperature=0.1, seed=3))
    await step.before(ctx)
    assert ctx.sampling == Sampling(max_tokens=32, temperature=0.8, top_p=0.9, seed=3, n=5)


async def test_picks_the_best_scoring_candidate_and_traces_all(reranker: Reranker):
    policy, step = make(reranker)
    reranker.observer.chosen_scores.clear()
    ctx = context(policy, OFF_TOPIC, ON_TOPIC, "I like trains.")
    chosen = await step.select(ctx)
    assert chosen is ctx.candidates[1]
    entries = ctx.detail["candidates"]
    assert [e["index"] for e in entries] == [0, 1, 2]
    assert max(entries, key=lambda e: e["score"])["index"] == 1
    assert all(e["length_penalty"] == 0.0 and e["refused_penalty"] == 0.0 for e in entries)
    assert ctx.detail["chosen"] == 1 and ctx.detail["chosen_score"] == entries[1]["score"]
    assert chosen.notes["reward"] == entries[1]["score"]
    assert reranker.observer.chosen_scores == [("bon", entries[1]["score"])]


async def test_refused_candidates_are_dropped(reranker: Reranker):
    policy, step = make(reranker)
    ctx = context(policy, OFF_TOPIC, ON_TOPIC)
    refuse(ctx.candidates[1])
    assert await step.select(ctx) is ctx.candidates[0]
    refused_entry = ctx.detail["candidates"][1]
    assert refused_entry["refused_by"] == "output_filter" and "score" not in refused_entry


async def test_all_refused_returns_none_without_scoring(reranker: Reranker):
    policy, step = make(reranker, reward={"type": "sequence_classifier", "path": "/nonexistent"})
    ctx = context(policy, ON_TOPIC, OFF_TOPIC)
    for candidate in ctx.candidates:
        refuse(candidate)
    assert await step.select(ctx) is None  # the runner answers with the refusal
    assert ctx.detail["chosen"] is None and len(ctx.detail["candidates"]) == 2


async def test_penalized_refusals_compete_as_their_refusal_text(reranker: Reranker):
    policy, step = make(reranker, refused="penalize", refused_penalty=0.25)
    ctx = context(policy, OFF_TOPIC, ON_TOPIC)
    refuse(ctx.candidates[1])
    chosen = await step.select(ctx)
    entries = ctx.detail["candidates"]
    [refusal_score] = await reranker.score(step.config.reward, QUESTION, ["I can't help with that."])
    # Scored in a batch with the other candidate (padded) vs alone: equal to float32 rounding.
    assert entries[1]["score"] == pytest.approx(refusal_score, abs=1e-5) and entries[1]["refused_penalty"] == 0.25
    expected_winner = max(entries, key=lambda e: e["score"] - e["refused_penalty"])["index"]
    assert ctx.detail["chosen"] == expected_winner
    # A refused winner means the refusal answers.
    assert chosen is (None if expected_winner == 1 else ctx.candidates[expected_winner])


async def test_refused_winner_makes_the_refusal_answer(reranker: Reranker):
    policy, step = make(reranker, refused="penalize", refused_penalty=0.0)
    ctx = context(policy, ON_TOPIC)
    refuse(ctx.candidates[0])
    assert await step.select(ctx) is None
    assert ctx.detail["chosen"] == 0


async def test_length_penalty_prefers_shorter_answers(reranker: Reranker):
    terse = "Paris."
    policy, plain = make(reranker)
    assert (await plain.select(context(policy, terse, ON_TOPIC))).text == ON_TOPIC  # more relevant
    policy, penalized = make(reranker, length_penalty=20.0)  # 0.02 per character
    ctx = context(policy, terse, ON_TOPIC)
    assert (await penalized.select(ctx)).text == terse
    penalties = [e["length_penalty"] for e in ctx.detail["candidates"]]
    assert penalties == pytest.approx([20.0 * len(terse) / 1000, 20.0 * len(ON_TOPIC) / 1000])


async def test_softmax_selection_is_reproducible_with_the_request_seed(reranker: Reranker):
    policy, step = make(reranker, selection="softmax", tau=5.0)
    picks = set()
    for _ in range(3):
        ctx = context(policy, OFF_TOPIC, ON_TOPIC, "The capital is Paris.", sampling=Sampling(seed=11))
        picks.add((await step.select(ctx)).index)
    assert len(picks) == 1


async def test_reward_failure_fails_the_request_by_default(reranker: Reranker):
    policy, step = make(reranker, reward={"type": "sequence_classifier", "path": "/nonexistent"})
    with pytest.raises(RerankError):
        await step.select(context(policy, ON_TOPIC, OFF_TOPIC))


async def test_reward_failure_can_fall_back_to_the_first_candidate(reranker: Reranker):
    policy, step = make(reranker, reward={"type": "sequence_classifier", "path": "/nonexistent"}, on_error="first")
    ctx = context(policy, ON_TOPIC, OFF_TOPIC)
    refuse(ctx.candidates[0])
    assert await step.select(ctx) is ctx.candidates[1]
    assert "not a model directory" in ctx.detail["error"] and ctx.detail["chosen"] == 1
