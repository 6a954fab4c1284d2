"""Reward models trained on preference pairs with a Bradley–Terry loss (`guard reward train`).

Two kinds:
  head                 a linear head over the bundled sentence embeddings and reply length (guard.rerank.trained): a logistic
                       regression on feature differences, which is exactly Bradley–Terry for a linear score.
                       CPU, seconds. Policies use it as `reward: {type: trained, path: HEAD.json}`.
  sequence-classifier  fine-tunes any local transformers causal LM as a one-logit sequence classifier
                       (LlamaForSequenceClassification and kin), on the GPU when there is one. Policies use it
                       as `reward: {type: sequence_classifier, path: DIR}`.
Both score prompt and reply exactly as guard's reranker will, and record the held-out pairwise accuracy
(pairs whose prompt never appeared in training) in the artefact.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from guard.alignment.preferences import PreferencePair, dedup, split
from guard.rerank.base import user_text
from guard.rerank.trained import features, head_of, save_head

MANIFEST = "guard-reward.json"


@dataclass(frozen=True)
class TrainReport:
    kind: str
    out: str
    train_pairs: int
    heldout_pairs: int
    train_accuracy: float
    heldout_accuracy: float | None  # None when no prompt fell in the held-out share
    seconds: float


def _fingerprint(pairs: list[PreferencePair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps(pair.to_json(), sort_keys=True).encode())
    return digest.hexdigest()


def _accuracy(margins: np.ndarray) -> float:
    return float((margins > 0).mean()) if len(margins) else float("nan")


def _training_split(
    pairs: list[PreferencePair], heldout_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair], list[PreferencePair]]:
    """(deduplicated pairs, training pairs, held-out pairs); ValueError when nothing is left to train on."""
    pairs = dedup(pairs)
    train, held = split(pairs, heldout_fraction, seed)
    if not train:
        raise ValueError("no preference pairs left for training (all were duplicates or held out)")
    return pairs, train, held


def _mirrored(differences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Both orders, so the fit is symmetric and needs no intercept: P(chosen > rejected) = sigmoid(w . (f_c - f_r)).
    return np.concatenate([differences, -differences]), np.r_[np.ones(len(differences)), np.zeros(len(differences))]


def _cross_validated_c(differences: np.ndarray, prompts: list[str], folds: int = 5) -> float:
    """The inverse penalty with the best pairwise accuracy on held-out prompts, over 5 folds of prompts.

    Hundreds of dimensions and often a few hundred pairs: the penalty decides whether the head learns the
    preference or the pairs it was shown.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    candidates = np.logspace(-5, 2, 15)
    if len(set(prompts)) < 2:
        return 1.0
    splits = list(GroupKFold(min(folds, len(set(prompts)))).split(differences, groups=prompts))
    accuracy = []
    for c in candidates:
        correct = 0
        for fit_rows, check_rows in splits:
            fit = LogisticRegression(C=c, fit_intercept=False, max_iter=4000).fit(*_mirrored(differences[fit_rows]))
            correct += int((differences[check_rows] @ fit.coef_[0] > 0).sum())
        accuracy.append(correct)
    # Ties go to the stronger penalty (the simpler head).
    return float(candidates[int(np.argmax(accuracy))])


def train_head(
    pairs: list[PreferencePair],
    out: Path,
    *,
    encoder: str | None = None,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    regularization: float | None = None,
) -> TrainReport:
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    from guard.safety.embedder import model_path

    started = time.perf_counter()
    pairs, train, held = _training_split(pairs, heldout_fraction, seed)
    model = SentenceTransformer(model_path(encoder), device="cpu", local_files_only=True)
    texts = sorted({text for pair in pairs for text in (user_text(pair.prompt), pair.chosen, pair.rejected)})
    embedded = model.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True).float()
    index = {text: row for row, text in enumerate(texts)}

    def difference(pair: PreferencePair) -> np.ndarray:
        query = embedded[index[user_text(pair.prompt)]]
        both = features(query, embedded[[index[pair.chosen], index[pair.rejected]]], [pair.chosen, pair.rejected])
        return (both[0] - both[1]).numpy()

    x_train = np.stack([difference(pair) for pair in train])
    if regularization is None:
        regularization = _cross_validated_c(x_train, [pair.prompt_key() for pair in train])
    fit = LogisticRegression(C=regularization, fit_intercept=False, max_iter=4000)
    fit.fit(*_mirrored(x_train))
    weights = fit.coef_[0].astype(np.float32)
    x_held = np.stack([difference(pair) for pair in held]) if held else np.zeros((0, len(weights)), dtype=np.float32)
    report = TrainReport(
        kind="head",
        out=str(out),
        train_pairs=len(train),
        heldout_pairs=len(held),
        train_accuracy=_accuracy(x_train @ weights),
        heldout_accuracy=_accuracy(x_held @ weights) if held else None,
        seconds=time.perf_counter() - started,
    )
    training = {
        "loss": "bradley-terry",
        "pairs_sha256": _fingerprint(pairs),
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "inverse_regularization_c": regularization,
        **{key: value for key, value in asdict(report).items() if key not in ("out", "kind")},
    }
    save_head(head_of(weights, encoder=encoder, training=training), out)
    return report


def train_sequence_classifier(
    pairs: list[PreferencePair],
    base: Path,
    out: Path,
    *,
    epochs: int = 1,
    learning_rate: float = 1e-5,
    batch_pairs: int = 8,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    device: str | None = None,
) -> TrainReport:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from guard.rerank.sources import chat_ids

    started = time.perf_counter()
    pairs, train, held = _training_split(pairs, heldout_fraction, seed)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # bf16 weights with fp32 maths would lose small updates: train in fp32, as the model is small enough to.
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32).to(target)
    model.config.pad_token_id = tokenizer.pad_token_id

    def scores(texts: list[list[int]]) -> torch.Tensor:
        padded = tokenizer.pad({"input_ids": texts}, padding=True, return_tensors="pt").to(target)
        return model(**padded).logits[:, 0]

    def ids(pair: PreferencePair) -> tuple[list[int], list[int]]:
        prompt = pair.prompt if isinstance(pair.prompt, str) else list(pair.prompt)
        return chat_ids(tokenizer, prompt, pair.chosen), chat_ids(tokenizer, prompt, pair.rejected)

    encoded_train, encoded_held = [ids(pair) for pair in train], [ids(pair) for pair in held]

    def margins(encoded: list[tuple[list[int], list[int]]]) -> np.ndarray:
        model.eval()
        out_margins = []
        with torch.no_grad():
            for start in range(0, len(encoded), batch_pairs):
                chunk = encoded[start : start + batch_pairs]
                both = scores([c for c, _ in chunk] + [r for _, r in chunk]).float()
                out_margins.append((both[: len(chunk)] - both[len(chunk) :]).cpu().numpy())
        return np.concatenate(out_margins) if out_margins else np.zeros(0)

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    generator = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        for start in range(0, len(encoded_train), batch_pairs):
            chunk = [encoded_train[i] for i in generator.permutation(len(encoded_train))[start : start + batch_pairs]]
            both = scores([c for c, _ in chunk] + [r for _, r in chunk])
            loss = -torch.nn.functional.logsigmoid(both[: len(chunk)] - both[len(chunk) :]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    report = TrainReport(
        kind="sequence-classifier",
        out=str(out),
        train_pairs=len(train),
        heldout_pairs=len(held),
        train_accuracy=_accuracy(margins(encoded_train)),
        heldout_accuracy=_accuracy(margins(encoded_held)) if held else None,
        seconds=time.perf_counter() - started,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    manifest = {
        "loss": "bradley-terry",
        "base": str(base),
        "pairs_sha256": _fingerprint(pairs),
        "epochs": epochs,
        "learning_rate": learning_rate,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        **{key: value for key, value in asdict(report).items() if key != "out"},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return report
