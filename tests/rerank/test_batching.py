"""Cross-request batching: pooling, token budget, failure isolation, cancellation, timeouts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from guard.policy.reward import SequenceClassifierReward
from guard.rerank import Reranker, RerankError
from guard.types import Message

PROMPTS = [
    "What is the capital of France?",
    "How do I reset my own email password?",
    "Write a short poem about the sea.",
    "Explain how a bicycle works.",
]
REPLIES = ["Paris is the capital.", "Open the account settings.", "The waves roll in."]


def config(path: Path) -> SequenceClassifierReward:
    return SequenceClassifierReward(type="sequence_classifier", path=str(path))


def count_pooled_calls(reranker_source) -> list[int]:
    """Wraps the batcher's call so the test sees how many requests each pooled call carried."""
    sizes: list[int] = []
    batcher = reranker_source._batcher
    run = batcher._run_sync

    def counting(items):
        sizes.append(len(items))
        return run(items)

    batcher._run_sync = counting
    return sizes


async def test_concurrent_requests_share_forward_passes(reranker: Reranker, observer, tiny_reward_dir: Path):
    source = await reranker.load(config(tiny_reward_dir))
    assert [n for _, n in observer.batches] == [1, 2]  # the warm-up request: its prompt, then its two replies
    observer.batches.clear()
    sizes = count_pooled_calls(source)
    results = await asyncio.gather(*(reranker.score(config(tiny_reward_dir), [Message("user", p)], REPLIES) for p in PROMPTS))
    assert sizes == [len(PROMPTS)]
    # One pass over the four prompts, one over all twelve replies.
    assert [n for _, n in observer.batches] == [len(PROMPTS), len(PROMPTS) * len(REPLIES)]
    assert [(kind, n) for kind, n in observer.scored_calls] == [("sequence_classifier", len(REPLIES))] * len(PROMPTS)
    for prompt, pooled in zip(PROMPTS, results, strict=True):
        alone = await reranker.score(config(tiny_reward_dir), [Message("user", prompt)], REPLIES)
        assert pooled == pytest.approx(alone, abs=1e-4)


async def test_token_budget_splits_pooled_calls(observer, tiny_reward_dir: Path):
    # Each request is ~3 x 20 tokens: a 100-token budget fits one request per call.
    reranker = Reranker(device="cpu", max_wait_ms=50.0, max_batch_tokens=100, observer=observer)
    try:
        source = await reranker.load(config(tiny_reward_dir))
        sizes = count_pooled_calls(source)
        await asyncio.gather(*(reranker.score(config(tiny_reward_dir), p, REPLIES) for p in PROMPTS))
        assert sizes == [1] * len(PROMPTS)
        # And forward passes stay within the budget too: at most 100 padded tokens per pass.
        assert max(n for _, n in observer.batches) <= 5
    finally:
        await reranker.close()


async def test_one_failing_request_does_not_fail_the_batch(reranker: Reranker, tiny_reward_dir: Path):
    source = await reranker.load(config(tiny_reward_dir))
    batcher = source._batcher
    run = batcher._run_sync

    def poisoned(items):
        # Fault injection: the request with five candidates breaks whatever batch it is in.
        if any(len(item) == 5 for item in items):
            raise RuntimeError("device fault")
        return run(items)

    batcher._run_sync = poisoned
    results = await asyncio.gather(
        reranker.score(config(tiny_reward_dir), PROMPTS[0], REPLIES),
        reranker.score(config(tiny_reward_dir), PROMPTS[1], ["a", "b", "c", "d", "e"]),
        reranker.score(config(tiny_reward_dir), PROMPTS[2], REPLIES),
        return_exceptions=True,
    )
    assert isinstance(results[1], RerankError) and "device fault" in str(results[1])
    batcher._run_sync = run
    assert results[0] == pytest.approx(await reranker.score(config(tiny_reward_dir), PROMPTS[0], REPLIES), abs=1e-4)
    assert results[2] == pytest.approx(await reranker.score(config(tiny_reward_dir), PROMPTS[2], REPLIES), abs=1e-4)


async def test_cancelled_request_leaves_others_alone(tiny_reward_dir: Path):
    reranker = Reranker(device="cpu", max_wait_ms=500.0)  # a long wait, so the cancel lands while queued
    try:
        source = await reranker.load(config(tiny_reward_dir))
        sizes = count_pooled_calls(source)
        tasks = [asyncio.create_task(reranker.score(config(tiny_reward_dir), p, REPLIES)) for p in PROMPTS[:3]]
        await asyncio.sleep(0.05)
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[1], asyncio.CancelledError)
        assert all(isinstance(r, list) and len(r) == len(REPLIES) for r in (done[0], done[2]))
        assert sizes == [2]  # the cancelled request never reached the model
    finally:
        await reranker.close()


async def test_deadline_is_a_rerank_error(reranker: Reranker, tiny_reward_dir: Path):
    await reranker.load(config(tiny_reward_dir))
    with pytest.raises(RerankError, match="no score within"):
        await reranker.score(config(tiny_reward_dir), PROMPTS[0], REPLIES, timeout=0.001)
    # The reranker is still usable afterwards.
    assert len(await reranker.score(config(tiny_reward_dir), PROMPTS[0], REPLIES)) == len(REPLIES)


async def test_no_candidates_scores_nothing(reranker: Reranker, tiny_reward_dir: Path):
    assert await reranker.score(config(tiny_reward_dir), PROMPTS[0], []) == []
