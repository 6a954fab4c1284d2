"""CausalHidden against each full sequence run alone through the model's own forward.

Every strategy, on every attention shape guard meets (grouped-query heads,
sliding windows shorter than the sequence, mixed sliding/full layers,
attention-logit soft-capping), must give the hidden states the stock model
gives one unpadded sequence, in fp32 within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2Model,
    Gemma3TextConfig,
    Gemma3TextModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralModel,
)

from guard.rerank.causal import CausalHidden, CostModel, Seq

TOL = 1e-4
VOCAB = 97


def _llama():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, num_labels=1,
    )
    return LlamaForSequenceClassification(config).base_model


def _mistral():
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=7,
    )
    return MistralModel(config)


def _gemma3():
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    return Gemma3TextModel(config)


def _gemma2():
    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8, attn_logit_softcapping=5.0,
    )
    return Gemma2Model(config)


MODELS = {"llama-gqa": _llama, "mistral-window": _mistral, "gemma3-mixed": _gemma3, "gemma2-softcap": _gemma2}


def _groups(seed: int = 0) -> list[list[Seq]]:
    generator = torch.Generator().manual_seed(seed)

    def tokens(count: int) -> list[int]:
        return torch.randint(1, VOCAB, (count,), generator=generator).tolist()

    prompt_a, prompt_b = tokens(19), tokens(11)
    shared_reply = tokens(3)
    return [
        # Replies of different lengths; two share leading tokens, so the prefix runs into the replies.
        [Seq(ids, [len(ids) - 1]) for ids in (prompt_a + shared_reply + tokens(5), prompt_a + shared_reply + tokens(2), prompt_a + tokens(9))],
        # Reads spanning the prefix/suffix boundary (an LM judge reads every reply position).
        [Seq(ids, list(range(10, len(ids)))) for ids in (prompt_b + tokens(4), prompt_b + tokens(7))],
        # A lone sequence, and a group whose candidates are identical (no suffix at all).
        [Seq(tokens(13), [0, 6, 12])],
        [Seq(ids, [len(ids) - 1]) for ids in [prompt_b + tokens(1)] * 2],
    ]


@torch.no_grad()
def _reference(base, groups: list[list[Seq]]) -> list[list[torch.Tensor]]:
    return [[base(input_ids=torch.tensor([seq.ids])).last_hidden_state[0, seq.read] for seq in group] for group in groups]


@pytest.mark.parametrize("strategy", ["shared", "whole", "auto"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_strategy_equals_each_sequence_alone(name: str, strategy: str):
    torch.manual_seed(0)
    base = MODELS[name]().eval()
    groups = _groups()
    expected = _reference(base, groups)
    engine = CausalHidden(base, max_batch_tokens=4096, strategy=strategy)
    got = engine.hidden(groups)
    for group_expected, group_got in zip(expected, got, strict=True):
        for want, have in zip(group_expected, group_got, strict=True):
            assert have.shape == want.shape
            assert torch.allclose(have, want, atol=TOL), (have - want).abs().max()


def test_small_budget_splits_prefix_and_suffix_passes_without_changing_results():
    torch.manual_seed(0)
    base = _llama().eval()
    groups = _groups(seed=3)
    expected = _reference(base, groups)
    passes: list[int] = []
    engine = CausalHidden(base, max_batch_tokens=40, strategy="shared", on_batch=passes.append)
    got = engine.hidden(groups)
    assert len(passes) > 3  # several prefix and suffix passes
    for group_expected, group_got in zip(expected, got, strict=True):
        for want, have in zip(group_expected, group_got, strict=True):
            assert torch.allclose(have, want, atol=TOL)


def test_auto_shares_only_when_the_saved_tokens_outweigh_a_second_pass():
    base = _llama().eval()
    prompt = list(range(1, 65))
    groups = [[Seq(prompt + [5, 6, i], [66]) for i in range(1, 9)]]  # 8 candidates on a 64-token prompt
    passes: list[int] = []
    engine = CausalHidden(base, max_batch_tokens=4096, strategy="auto", on_batch=passes.append)

    engine.cost = CostModel(per_pass=0.0, per_token=1.0)  # compute-bound: sharing saves 7 x 64 tokens
    engine.hidden(groups)
    assert passes == [1, 8]  # one prefix row, then eight suffix rows

    passes.clear()
    engine.cost = CostModel(per_pass=1.0, per_token=1e-6)  # launch-bound: one pass beats two
    engine.hidden(groups)
    assert passes == [8]


def test_calibration_measures_a_positive_cost_per_token():
    engine = CausalHidden(_llama().eval(), max_batch_tokens=4096)
    cost = engine.calibrate(tokens=128)
    assert cost.per_token > 0 and cost.per_pass >= 0


def test_ordinary_forward_calls_keep_padding_semantics_after_the_engine_is_installed():
    torch.manual_seed(0)
    model = _llama().eval()
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
        CausalHidden(model, max_batch_tokens=4096)
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(before[0], after[0], atol=TOL)
    assert torch.allclose(before[1, :6], after[1, :6], atol=TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["shared", "whole"])
def test_bf16_on_cuda_agrees_with_fp32_within_bf16_noise(strategy: str):
    torch.manual_seed(0)
    reference = _llama().eval()
    groups = _groups()
    expected = _reference(reference, groups)
    engine = CausalHidden(reference.to("cuda", torch.bfloat16), max_batch_tokens=4096, strategy=strategy)
    for group_expected, group_got in zip(expected, engine.hidden(groups), strict=True):
        for want, have in zip(group_expected, group_got, strict=True):
            # bf16 keeps 8 bits of mantissa: compare against the hidden states' own scale.
            assert (have.float().cpu() - want).abs().max() <= 0.05 * want.abs().max()
