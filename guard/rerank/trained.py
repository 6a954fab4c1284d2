"""Reward heads trained from users' preferences (`guard reward train`), and how they score.

A head scores a reply to a request from sentence embeddings: features are the
reply's embedding, its element-wise product with the request's (what the reply
says, and how it relates to what was asked) and the log of its length in words
(a mean-pooled, normalised embedding cannot see length, and users' preferences
often track it), and the score is their dot product with the head's weights. Trained with a Bradley–Terry loss on
(chosen, rejected) pairs, the difference of two scores is the log-odds that
users prefer the first. The artefact is one JSON file: weights as float32
base64, plus what it was trained on and its held-out pairwise accuracy.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT = "guard-reward/1"


class RewardHead(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["guard-reward/1"]
    kind: Literal["embedding_head"] = "embedding_head"
    encoder: str | None = Field(None, description="Sentence-transformers model directory; None: the bundled MiniLM.")
    dims: int = Field(..., ge=1, description="Embedding width; the weights have 2 x dims + 1 entries.")
    weights: str = Field(..., description="float32 little-endian, base64.")
    training: dict[str, Any] = Field(default_factory=dict, description="Data, split and held-out pairwise accuracy.")

    def vector(self) -> np.ndarray:
        array = np.frombuffer(base64.b64decode(self.weights), dtype="<f4")
        if array.shape != (2 * self.dims + 1,):
            raise ValueError(f"weights have {array.size} entries; expected {2 * self.dims + 1}")
        return array


def features(query: torch.Tensor, replies: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """[n, 2d + 1] from a request's embedding [d], its replies' [n, d] (both L2-normalised) and their texts."""
    words = torch.tensor([math.log1p(len(text.split())) for text in texts], dtype=replies.dtype, device=replies.device)
    return torch.cat([replies, replies * query[None, :], words[:, None]], dim=1)


def save_head(head: RewardHead, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(head.model_dump(mode="json"), indent=1) + "\n")


def head_of(weights: np.ndarray, *, encoder: str | None, training: dict[str, Any]) -> RewardHead:
    vector = np.ascontiguousarray(weights, dtype="<f4")
    return RewardHead(
        format=FORMAT, encoder=encoder, dims=(vector.size - 1) // 2, weights=base64.b64encode(vector.tobytes()).decode(), training=training
    )


def load_head(path: str) -> tuple[RewardHead, np.ndarray]:
    """The head at `path`; ValueError naming the file and what is wrong with it."""
    file = Path(path).expanduser()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such reward head") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a JSON reward head ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"{path}: not a guard reward head (format {found!r}, expected {FORMAT!r})")
    try:
        head = RewardHead.model_validate(data)
        return head, head.vector()
    except (ValidationError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
