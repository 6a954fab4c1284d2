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
from guard.types import Choice, Completion, GenerateInput, Message, Refusal, Sampling

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


async def test_the_trace_shows_the_texts_of_candidates_that_were_not_refused_only(reranker: Reranker):
    policy, step = make(reranker)
    ctx = context(policy, OFF_TOPIC, ON_TOPIC, "I like trains.")
    refuse(ctx.candidates[2])
    await step.select(ctx)
    entries = ctx.detail["candidates"]
    assert [e.get("text") for e in entries] == [OFF_TOPIC, ON_TOPIC, None]
    assert "trains" not in repr(ctx.detail)  # a refused candidate's text never reaches a client's trace


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


class ChunkedUpstream:
    """Candidate k is `lengths[k]` tokens "wk "; a call grows each of its candidates by at most max_tokens.

    Usage is reported as vLLM does: prompt tokens once per call (whatever its n), the re-sent partial
    answer counted in a continuation's prompt; a token is a whitespace-separated word."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self.calls: list[dict[str, Any]] = []
        self.seeds: list[int | None] = []

    async def generate(self, model, *, prompt, messages, sampling, continue_final_message, **_: Any) -> Completion:
        sent = prompt if messages is None else " ".join(m.content for m in messages)
        if continue_final_message:
            partial = prompt[len(PROMPT):] if messages is None else messages[-1].content
            ids = [int(partial.split()[0][1:])]
        else:
            partial, ids = "", list(range(sampling.n))
        done = len(partial.split())
        choices = []
        for index, k in enumerate(ids):
            grow = min(sampling.max_tokens, self.lengths[k] - done)
            finish = "stop" if done + grow == self.lengths[k] else "length"
            choices.append(Choice(index=index, text=f"w{k} " * grow, finish_reason=finish))
        completion = Completion(tuple(choices), len(sent.split()), sum(len(c.text.split()) for c in choices), model)
        self.calls.append(dict(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens))
        self.seeds.append(sampling.seed)
        return completion


class ScoreById:
    """A reward that prefers candidates with higher ids, so which ones are pruned is known."""

    async def score(self, source, prompt, texts, timeout=None) -> list[float]:
        return [float(text.split()[0][1:]) for text in texts]


PROMPT = "Question: What is the capital of France? Answer: "


def pruning(upstream: ChunkedUpstream, chat: bool, seed: int | None = None, **options: Any) -> tuple[Any, Context]:
    step = {"type": "best_of_n", "n": 4, "reward": {"type": "embedding"}, **options}
    policy = Policy.model_validate({"name": "sr", "steps": [step]})
    config = policy.steps[0]
    step = step_class(config.type)(config, StepDeps(upstream=upstream, reranker=ScoreById()))  # type: ignore[arg-type]
    sampling = Sampling(max_tokens=12, n=4, seed=seed)
    if chat:
        request, prompt, messages = GenerateInput(messages=list(QUESTION), sampling=sampling), None, list(QUESTION)
    else:
        request, prompt, messages = GenerateInput(prompt=PROMPT, sampling=sampling), PROMPT, None
    ctx = Context(request, policy, "v", "m", sampling, prompt=prompt, messages=messages)
    return step, ctx


@pytest.mark.parametrize("chat", [True, False])
async def test_speculative_rejection_accounts_every_upstream_token(chat: bool):
    upstream = ChunkedUpstream(lengths=[12] * 4)
    step, ctx = pruning(upstream, chat, speculative_rejection={"chunk_tokens": 4, "keep_fraction": 0.5})
    completion = await step.generate(ctx)
    p = 6 if chat else 8  # prompt tokens of the question as sent
    # 4 fresh candidates × 4 tokens; keep ids 2, 3, each re-sent with 4 tokens; keep id 3, re-sent with 8.
    assert upstream.calls == [
        {"prompt_tokens": p, "completion_tokens": 16},
        {"prompt_tokens": p + 4, "completion_tokens": 4},
        {"prompt_tokens": p + 4, "completion_tokens": 4},
        {"prompt_tokens": p + 8, "completion_tokens": 4},
    ]
    assert [c.text for c in completion.choices] == ["w3 " * 12]
    assert ctx.detail["rounds"] == [
        {"after_tokens": 4, "unfinished": 4, "pruned": 2},
        {"after_tokens": 8, "unfinished": 2, "pruned": 1},
    ]
    assert ctx.detail["generation_rounds"] == 3 and ctx.detail["upstream_calls"] == 4
    assert ctx.detail["upstream_prompt_tokens"] == 4 * p + 16 and ctx.detail["resent_prompt_tokens"] == 3 * p + 16
    assert ctx.detail["upstream_completion_tokens"] == 28
    # The client's usage is what the upstream processed, re-sent prompts included.
    assert (completion.prompt_tokens, completion.completion_tokens) == (4 * p + 16, 28)


async def test_finished_candidates_are_neither_continued_nor_counted_again():
    # id 0 stops after 3 tokens, id 1 after 6: only unfinished ones are ranked, pruned and re-sent.
    upstream = ChunkedUpstream(lengths=[3, 6, 12, 12])
    rejection = {"chunk_tokens": 4, "keep_fraction": 0.5, "min_candidates": 3}
    step, ctx = pruning(upstream, True, speculative_rejection=rejection)
    completion = await step.generate(ctx)
    assert upstream.calls == [
        {"prompt_tokens": 6, "completion_tokens": 15},  # 3 + 4 + 4 + 4
        {"prompt_tokens": 10, "completion_tokens": 2},  # id 1 stops at 6
        {"prompt_tokens": 10, "completion_tokens": 4},
        {"prompt_tokens": 10, "completion_tokens": 4},
        {"prompt_tokens": 14, "completion_tokens": 4},
        {"prompt_tokens": 14, "completion_tokens": 4},
    ]
    assert ctx.detail["rounds"] == []  # never fewer than min_candidates unfinished: nothing pruned
    assert [c.finish_reason for c in completion.choices] == ["stop"] * 4
    assert [len(c.text.split()) for c in completion.choices] == [3, 6, 12, 12]
    assert ctx.detail["upstream_calls"] == 6 and ctx.detail["generation_rounds"] == 3
    assert (completion.prompt_tokens, completion.completion_tokens) == (64, 33)
    assert ctx.detail["upstream_prompt_tokens"] == 64 and ctx.detail["upstream_completion_tokens"] == 33


async def test_each_continuation_samples_with_its_own_seed():
    # vLLM seeds the first call's 4 samples 100..103; reusing 100 would replay sample 0's random stream.
    rejection = {"chunk_tokens": 4, "keep_fraction": 0.5}
    for seed, expected in ((100, [100, 104, 105, 106]), (None, [None] * 4)):
        upstream = ChunkedUpstream(lengths=[12] * 4)
        step, ctx = pruning(upstream, True, seed=seed, speculative_rejection=rejection)
        await step.generate(ctx)
        assert upstream.seeds == expected
