"""Reward models follow the loaded policies: loaded and warmed when a policy names them, closed and
freed when none does any more, and never pulled from under a request already queued on them."""

from __future__ import annotations

import asyncio
import gc
import shutil
import weakref
from pathlib import Path

from guard.policy.reward import SequenceClassifierReward, WeightedReward
from guard.rerank import Reranker


def classifier(path: Path) -> SequenceClassifierReward:
    return SequenceClassifierReward(type="sequence_classifier", path=str(path))


async def test_retained_models_load_and_warm_before_any_request(reranker: Reranker, observer, tiny_reward_dir: Path):
    config = classifier(tiny_reward_dir)
    reranker.retain([config])
    await reranker.settled()
    assert reranker.is_loaded(config)
    assert [n for _, n in observer.batches] == [1, 2]  # the warm-up request ran: prefix, then two replies
    assert observer.scored_calls == []  # and no request was needed for it


async def test_a_model_no_policy_names_is_closed_and_freed(reranker: Reranker, tiny_reward_dir: Path):
    config = classifier(tiny_reward_dir)
    reranker.retain([config])
    await reranker.settled()
    model = weakref.ref((await reranker.load(config)).model)

    reranker.retain([])
    await reranker.settled()
    assert not reranker.is_loaded(config)
    # The weights are gone, not just unlisted. The worker thread drops its last call a moment
    # after the loop sees that call's result, so allow it that moment.
    for _ in range(200):
        gc.collect()
        if model() is None:
            break
        await asyncio.sleep(0.01)
    assert model() is None


async def test_weighted_sources_keep_their_children(reranker: Reranker, tiny_reward_dir: Path):
    child = classifier(tiny_reward_dir)
    weighted = WeightedReward.model_validate(
        {"type": "weighted", "sources": [{"weight": 1.0, "source": child.model_dump()}]}
    )
    reranker.retain([weighted])
    await reranker.settled()
    assert reranker.is_loaded(weighted) and reranker.is_loaded(child)
    reranker.retain([child])
    await reranker.settled()
    assert reranker.is_loaded(child) and not reranker.is_loaded(weighted)


async def test_requests_queued_on_an_unloaded_model_still_get_their_scores(reranker: Reranker, tiny_reward_dir: Path):
    config = classifier(tiny_reward_dir)
    reranker.retain([config])
    await reranker.settled()
    pending = [asyncio.ensure_future(reranker.score(config, f"prompt {i}", ["a", "b", "c"])) for i in range(6)]
    await asyncio.sleep(0)  # queued
    reranker.retain([])
    results = await asyncio.gather(*pending)
    assert all(len(scores) == 3 for scores in results)
    await reranker.settled()
    assert not reranker.is_loaded(config)


async def test_a_request_for_a_model_no_policy_names_does_not_keep_it(reranker: Reranker, tiny_reward_dir: Path, tmp_path: Path):
    old = classifier(tiny_reward_dir)
    new = classifier(shutil.copytree(tiny_reward_dir, tmp_path / "retrained"))
    reranker.retain([new])
    await reranker.settled()
    # A request of the policy version just reloaded away still finishes with its own model...
    assert len(await reranker.score(old, "hi", ["a", "b"])) == 2
    await reranker.settled()
    # ...which then goes, while the one the policy names now stays.
    assert not reranker.is_loaded(old) and reranker.is_loaded(new)


async def test_a_model_that_cannot_load_is_logged_and_left_to_requests(reranker: Reranker, tmp_path: Path, caplog):
    broken = classifier(tmp_path / "no-such-model")
    reranker.retain([broken])
    await reranker.settled()
    assert not reranker.is_loaded(broken)
    assert "could not load the sequence_classifier reward" in caplog.text
