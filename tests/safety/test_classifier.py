"""Classifier artefacts: the numpy head, loading errors, the shipped artefact's provenance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from guard.safety.classifier import FORMAT, Artefact, Head, Layer, default_artefact_path, encode_array, load_artefact

REPO = Path(__file__).resolve().parents[2]


def artefact(layers, dim=3, threshold=0.5) -> Artefact:
    return Artefact(format=FORMAT, dim=dim, layers=layers, threshold=threshold)


def test_a_logistic_head_is_sigmoid_of_the_dot_product():
    weight, bias = np.array([[1.0, -2.0, 0.5]]), np.array([0.25])
    head = Head(artefact([Layer(shape=(1, 3), weight=encode_array(weight), bias=encode_array(bias), activation="none")]))
    x = np.array([[0.1, 0.2, 0.3], [1.0, 0.0, 0.0]], dtype=np.float32)
    expected = 1 / (1 + np.exp(-(x @ weight.T + bias)[:, 0]))
    np.testing.assert_allclose(head.probabilities(x), expected, rtol=1e-6)


def test_a_two_layer_head_applies_relu_between_layers():
    w1 = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    w2 = np.array([[1.0, 1.0]])
    layers = [
        Layer(shape=(2, 3), weight=encode_array(w1), bias=encode_array(np.zeros(2)), activation="relu"),
        Layer(shape=(1, 2), weight=encode_array(w2), bias=encode_array(np.zeros(1)), activation="none"),
    ]
    head = Head(artefact(layers))
    # relu(x) + relu(-x) = |x|: without the relu the two units would cancel to 0.5.
    assert head.probabilities(np.array([[-2.0, 0, 0]], dtype=np.float32))[0] == pytest.approx(1 / (1 + np.exp(-2.0)))


def test_layers_that_do_not_chain_are_rejected():
    bad = [Layer(shape=(1, 4), weight=encode_array(np.zeros((1, 4))), bias=encode_array(np.zeros(1)), activation="none")]
    with pytest.raises(ValueError, match="takes 4 inputs"):
        Head(artefact(bad))


def test_loading_a_missing_or_foreign_file_names_it(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_artefact(str(tmp_path / "nope.json"))
    foreign = tmp_path / "model.json"
    foreign.write_text(json.dumps({"format": "pickle"}))
    with pytest.raises(ValueError, match="model.json"):
        load_artefact(str(foreign))


def test_the_shipped_artefact_records_the_exact_training_data():
    artefact, head = load_artefact(None)
    assert artefact.training["data"], "the shipped artefact must list its training data"
    for entry in artefact.training["data"]:
        path = REPO / entry["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], f"{path} changed since training"
        assert "harmbench" not in entry["path"].lower() and "phrasing" not in entry["path"].lower()
    assert 0.0 < artefact.threshold < 1.0
    assert default_artefact_path().is_file()


def test_the_direct_encoder_path_equals_sentence_transformers_encode():
    from guard.safety.embedder import Embedder

    embedder = Embedder()
    texts = ["short", "a much longer sentence with many more words in it than the first one", "mid length text"]
    expected = embedder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(embedder.encode(texts), expected, atol=1e-5)


def test_the_committed_splits_are_exactly_what_the_split_script_builds(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("safety_splits", REPO / "scripts" / "safety_splits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "data" / "safety" / "splits" / name).read_bytes(), name
    heldout = {json.loads(line)["text"] for line in (tmp_path / "heldout.jsonl").read_text().splitlines()}
    train = {json.loads(line)["text"] for line in (tmp_path / "train.jsonl").read_text().splitlines()}
    assert not heldout & train
