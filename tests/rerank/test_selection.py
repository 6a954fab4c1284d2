"""Selection: penalties, z-scoring, argmax and softmax sampling over ragged rows."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from guard.rerank import selection


def test_argmax_per_row_over_ragged_rows():
    scores = [[0.1, 0.9, 0.5], [2.0], [-1.0, -3.0, 4.0, 4.0]]
    # Ties go to the first; padding of short rows never wins even though it is 0 > -1.
    assert selection.select(scores) == [1, 0, 2]
    assert selection.select([[-5.0, -7.0]]) == [0]


def test_penalties_are_subtracted():
    scores = [[1.0, 0.8, 0.2]]
    assert selection.select(scores, [[0.5, 0.0, 0.0]]) == [1]
    assert selection.select(scores, [[0.9, 0.7, 0.0]]) == [2]


def test_zscore_keeps_argmax_and_survives_equal_scores():
    rows = [[3.0, 10.0, -2.0], [5.0, 5.0, 5.0]]
    assert selection.select(rows, normalize="zscore") == selection.select(rows) == [1, 0]


def test_softmax_sampling_follows_softmax_of_scores_over_tau():
    scores, tau, draws = [0.0, 1.0, 2.0], 0.5, 20000
    generator = torch.Generator().manual_seed(0)
    picks = selection.select([scores] * draws, rule="softmax", tau=tau, generator=generator)
    counts = Counter(picks)
    weights = [math.exp(s / tau) for s in scores]
    for index, weight in enumerate(weights):
        expected = weight / sum(weights)
        assert counts[index] / draws == pytest.approx(expected, abs=0.015)


def test_softmax_sampling_applies_zscore_before_tau():
    # Scores on a 1000x scale: z-scored, tau=1 samples broadly; raw, it would always pick the top.
    generator = torch.Generator().manual_seed(1)
    picks = selection.select([[0.0, 1000.0, 2000.0]] * 2000, rule="softmax", normalize="zscore", generator=generator)
    assert set(picks) == {0, 1, 2}


def test_softmax_is_reproducible_with_a_seeded_generator():
    rows = [[random.Random(i).random() for _ in range(8)] for i in range(50)]

    def draw():
        return selection.select(rows, rule="softmax", tau=0.3, generator=torch.Generator().manual_seed(7))

    assert draw() == draw()


def test_empty_row_is_rejected():
    with pytest.raises(ValueError):
        selection.select([[1.0], []])
