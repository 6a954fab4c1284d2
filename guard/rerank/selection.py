"""Fused best-of-n selection over a ragged [requests x n] score set.

Per row: subtract penalties, optionally z-score, then argmax, or sample from
softmax(score / tau) via the Gumbel-max trick (argmax(score / tau + g) with
g = -log(-log(u))), which is an exact softmax sample and, given the same
uniforms, makes the same choice in every implementation. The uniforms come from
the caller's seeded generator, so the Triton kernel (CUDA) and the torch
fallback (CPU) pick identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the fallback.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

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
    """Chosen index per row (the reference implementation; same arithmetic order as the kernel)."""
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


if triton is not None:

    @triton.jit
    def _select_kernel(
        scores_ptr,
        penalties_ptr,
        gumbel_ptr,
        lengths_ptr,
        out_ptr,
        stride,
        inv_tau,
        eps,
        ZSCORE: tl.constexpr,
        SAMPLE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per request; a row (n <= 64 candidates) fits one block.
        row = tl.program_id(0)
        n = tl.load(lengths_ptr + row)
        cols = tl.arange(0, BLOCK)
        valid = cols < n
        offsets = row * stride + cols
        x = tl.load(scores_ptr + offsets, mask=valid, other=0.0) - tl.load(penalties_ptr + offsets, mask=valid, other=0.0)
        if ZSCORE:
            count = n.to(tl.float32)
            mean = tl.sum(x, axis=0) / count
            centred = tl.where(valid, x - mean, 0.0)
            var = tl.sum(centred * centred, axis=0) / count
            x = (x - mean) / tl.sqrt(var + eps)
        if SAMPLE:
            x = x * inv_tau + tl.load(gumbel_ptr + offsets, mask=valid, other=0.0)
        x = tl.where(valid, x, float("-inf"))
        tl.store(out_ptr + row, tl.argmax(x, axis=0))


def select_triton(packed: Packed, *, sample: bool, tau: float, zscore: bool) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed")
    rows, width = packed.scores.shape
    out = torch.empty(rows, dtype=torch.int32, device=packed.scores.device)
    _select_kernel[(rows,)](
        packed.scores,
        packed.penalties,
        packed.gumbel,
        packed.lengths,
        out,
        packed.scores.stride(0),
        1.0 / tau,
        ZSCORE_EPS,
        ZSCORE=zscore,
        SAMPLE=sample,
        BLOCK=triton.next_power_of_2(width),
    )
    return out


def select(
    scores: list[list[float]],
    penalties: list[list[float]] | None = None,
    *,
    rule: Literal["argmax", "softmax"] = "argmax",
    tau: float = 1.0,
    normalize: Literal["none", "zscore"] = "none",
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> list[int]:
    """The chosen candidate index of each request. On a CUDA device with Triton, one kernel launch."""
    sample = rule == "softmax"
    packed = pack(scores, penalties, sample=sample, generator=generator)
    zscore = normalize == "zscore"
    if device is not None and device.type == "cuda" and triton is not None:
        on_device = Packed(*(t.to(device, non_blocking=True) for t in (packed.scores, packed.penalties, packed.gumbel, packed.lengths)))
        return select_triton(on_device, sample=sample, tau=tau, zscore=zscore).tolist()
    return select_torch(packed, sample=sample, tau=tau, zscore=zscore).tolist()
