"""Best-of-n selection over a ragged [requests x n] score set, on the CPU.

Per row: subtract penalties, optionally z-score, then argmax, or sample from
softmax(score / tau) via the Gumbel-max trick (argmax(score / tau + g) with
g = -log(-log(u))), which is an exact softmax sample. The uniforms come from
the caller's seeded generator, so a request's seed reproduces its choice.

It runs on the CPU on purpose: a request has at most a few dozen scores, and a
GPU kernel (guard had a Triton one) costs a launch plus a device-to-host copy
that waits for every forward pass queued before it, on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# Keeps an all-equal row finite under z-scoring (its scores all become 0).
ZSCORE_EPS = 1e-6


@dataclass(frozen=True)
class Packed:
    """Rows padded to the widest; `lengths` says how many entries of each row are real."""

    scores: torch.Tensor  # [R, N] float32
    penalties: torch.Tensor  # [R, N] float32
    gumbel: torch.Tensor  # [R, N] float32, zeros for argmax
    lengths: torch.Tensor  # [R] int32


def pack(
    scores: list[list[float]],
    penalties: list[list[float]] | None,
    *,
    sample: bool,
    generator: torch.Generator | None,
) -> Packed:
    if not scores or any(len(row) == 0 for row in scores):
        raise ValueError("every request needs at least one candidate")
    rows, width = len(scores), max(len(row) for row in scores)
    packed_scores = torch.zeros(rows, width)
    packed_penalties = torch.zeros(rows, width)
    for r, row in enumerate(scores):
        packed_scores[r, : len(row)] = torch.tensor(row)
        if penalties is not None:
            packed_penalties[r, : len(row)] = torch.tensor(penalties[r])
    gumbel = torch.zeros(rows, width)
    if sample:
        # Open interval: log(0) and log(-log(1)) are infinite.
        uniform = torch.rand(rows, width, generator=generator).clamp_(1e-12, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform))
    lengths = torch.tensor([len(row) for row in scores], dtype=torch.int32)
    return Packed(packed_scores, packed_penalties, gumbel, lengths)


def select_torch(packed: Packed, *, sample: bool, tau: float, zscore: bool) -> torch.Tensor:
    """Chosen index per row."""
    scores, lengths = packed.scores, packed.lengths.to(packed.scores.device)
    valid = torch.arange(scores.shape[1], device=scores.device)[None, :] < lengths[:, None]
    x = torch.where(valid, scores - packed.penalties, 0.0)
    if zscore:
        count = lengths.to(torch.float32)[:, None]
        mean = x.sum(dim=1, keepdim=True) / count
        centred = torch.where(valid, x - mean, 0.0)
        var = (centred * centred).sum(dim=1, keepdim=True) / count
        x = (x - mean) / torch.sqrt(var + ZSCORE_EPS)
    if sample:
        x = x * (1.0 / tau) + packed.gumbel
    x = torch.where(valid, x, float("-inf"))
    return x.argmax(dim=1)


def select(
    scores: list[list[float]],
    penalties: list[list[float]] | None = None,
    *,
    rule: Literal["argmax", "softmax"] = "argmax",
    tau: float = 1.0,
    normalize: Literal["none", "zscore"] = "none",
    generator: torch.Generator | None = None,
) -> list[int]:
    """The chosen candidate index of each request."""
    sample = rule == "softmax"
    packed = pack(scores, penalties, sample=sample, generator=generator)
    return select_torch(packed, sample=sample, tau=tau, zscore=normalize == "zscore").tolist()
