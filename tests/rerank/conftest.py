"""Rerank fixtures: a CPU fp32 Reranker and tiny local models (random weights, nothing downloaded)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from guard.rerank import Reranker
from tests.support.tiny_models import build_tokenizer


class Observer:
    """Records what the Reranker reports, for asserting on batching."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []
        self.scored_calls: list[tuple[str, int]] = []
        self.chosen_calls: list[tuple[str, float]] = []

    def scored(self, source: str, candidates: int, seconds: float) -> None:
        self.scored_calls.append((source, candidates))

    def batch(self, source: str, sequences: int) -> None:
        self.batches.append((source, sequences))

    def chosen(self, policy: str, score: float) -> None:
        self.chosen_calls.append((policy, score))


@pytest.fixture
def observer() -> Observer:
    return Observer()


@pytest.fixture
async def reranker(observer: Observer) -> AsyncIterator[Reranker]:
    reranker = Reranker(device="cpu", max_wait_ms=20.0, observer=observer)
    yield reranker
    await reranker.close()


def _write(model, out: Path) -> Path:
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sliding_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mistral reward model whose 12-token sliding window is shorter than the test sequences."""
    from transformers import MistralConfig, MistralForSequenceClassification

    tokenizer = build_tokenizer()
    torch.manual_seed(2)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=12,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    return _write(MistralForSequenceClassification(config), tmp_path_factory.mktemp("mistral-rm"))


@pytest.fixture(scope="session")
def gemma_judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Gemma 3 causal LM (mixed sliding/full layers, logit soft-capping) like the bundled default model."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = build_tokenizer()
    torch.manual_seed(3)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=10,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=5.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _write(Gemma3ForCausalLM(config), tmp_path_factory.mktemp("gemma-judge"))
