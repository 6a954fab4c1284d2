"""best_of_n end to end: n candidates from one vLLM call, scored by a local reward model, best returned."""

from __future__ import annotations

import grpc
import pytest

from tests.integration.test_grpc_vllm import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bon_policy(guard, policy_dir, tiny_reward_dir):
    (policy_dir / "bon.yaml").write_text(
        "name: bon\n"
        "sampling: {max_tokens: 12}\n"
        "steps:\n"
        "  - type: best_of_n\n"
        "    n: 4\n"
        "    temperature: 1.0\n"
        f"    reward: {{type: sequence_classifier, path: '{tiny_reward_dir}'}}\n"
    )
    assert wait_for(lambda: "bon" in {p.name for p in guard.list_policies()}, timeout=5)
    return "bon"


@pytest.fixture(scope="module")
def guard(guard_server):
    from guard.client import GuardClient

    with GuardClient(guard_server.target) as client:
        yield client


def test_best_of_n_returns_the_highest_scoring_candidate(guard, bon_policy):
    prompt = [("user", "Tell me about the old map.")]
    answer = guard.generate(prompt, policy=bon_policy, seed=7, trace=True, timeout=120)
    assert not answer.refused
    [select] = [s for s in answer.trace["steps"] if s["type"] == "best_of_n" and s["phase"] == "select"]
    candidates = select["detail"]["candidates"]
    assert [c["index"] for c in candidates] == [0, 1, 2, 3]
    scores = [c["score"] for c in candidates]
    assert len(set(scores)) > 1, "four sampled candidates should not all score the same"
    chosen = int(select["detail"]["chosen"])
    assert scores[chosen] == max(scores)
    # The text returned is the one that earned the chosen score: re-score it with the Score RPC.
    [rescored] = guard.score(prompt, [answer.text], policy=bon_policy)
    assert rescored == pytest.approx(select["detail"]["chosen_score"], abs=1e-4)
    # All n candidates came from vLLM in one call: completion tokens cover every candidate.
    assert answer.completion_tokens > 12


def test_score_rpc_orders_candidates_like_the_reward_model(guard, bon_policy):
    prompt = "Write about the kitchen table."
    candidates = ["The kitchen table was old.", "a a a a a a", "We cleaned the kitchen table after school."]
    scores = guard.score(prompt, candidates, policy=bon_policy)
    assert len(scores) == 3
    # Scoring is per candidate: the same candidate alone gets the same score (batching is invisible).
    assert guard.score(prompt, [candidates[1]], policy=bon_policy)[0] == pytest.approx(scores[1], abs=1e-4)


def test_score_rpc_errors(guard, bon_policy):
    with pytest.raises(grpc.RpcError) as raised:
        guard.score("hi", [], policy=bon_policy)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("candidates:")
    with pytest.raises(grpc.RpcError) as raised:
        guard.score("hi", ["x"], policy="default")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("policy:")


@pytest.mark.parametrize("chat", [True, False])
def test_speculative_rejection_prunes_and_generates_fewer_tokens(guard, policy_dir, tiny_reward_dir, chat):
    (policy_dir / "bon-sr.yaml").write_text(
        "name: bon-sr\n"
        "sampling: {max_tokens: 24, stop: ['never-appears-xyz']}\n"
        "steps:\n"
        "  - type: best_of_n\n"
        "    n: 8\n"
        "    temperature: 1.0\n"
        f"    reward: {{type: sequence_classifier, path: '{tiny_reward_dir}'}}\n"
        "    speculative_rejection: {chunk_tokens: 6, keep_fraction: 0.5}\n"
    )
    assert wait_for(lambda: "bon-sr" in {p.name for p in guard.list_policies()}, timeout=5)
    prompt = [("user", "Tell me about the red car.")] if chat else "The red car"
    answer = guard.generate(prompt, policy="bon-sr", seed=3, trace=True, timeout=120)
    assert not answer.refused and answer.text
    steps = {(s["type"], s["phase"]): s for s in answer.trace["steps"]}
    generated = steps[("best_of_n", "generate")]["detail"]
    rounds = generated["rounds"]
    assert rounds and rounds[0]["after_tokens"] == 6
    assert all(r["pruned"] > 0 for r in rounds)
    # Plain best-of-8 would generate up to 8 × 24 tokens; pruning stops most candidates early.
    assert answer.completion_tokens == generated["upstream_completion_tokens"] < 8 * 24
    # Usage counts every upstream call: each continuation re-sent the prompt and a partial answer.
    assert answer.prompt_tokens == generated["upstream_prompt_tokens"] > generated["resent_prompt_tokens"] > 0
    survivors = steps[("best_of_n", "select")]["detail"]["candidates"]
    assert 1 <= len(survivors) < 8
    chosen = int(steps[("best_of_n", "select")]["detail"]["chosen"])
    assert survivors[chosen]["score"] == max(c["score"] for c in survivors)
