"""Reward models trained on preference pairs learn a preference they were never told, and guard's
reranker scores with what was written exactly as the trainer measured it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from guard.alignment.preferences import PreferencePair, split
from guard.alignment.reward_training import MANIFEST, train_head, train_sequence_classifier
from guard.policy.reward import SequenceClassifierReward, TrainedReward
from guard.rerank import Reranker
from guard.rerank.trained import load_head

TOPICS = [
    "volcanoes", "tides", "photosynthesis", "bread baking", "compound interest", "bicycles", "rainbows", "honey bees",
    "glaciers", "the printing press", "vaccines", "solar panels", "chess openings", "coral reefs", "jet engines",
    "sourdough", "earthquakes", "the water cycle", "electric cars", "migratory birds", "black holes", "recycling",
    "coffee roasting", "the immune system", "wind turbines", "dinosaurs", "the stock market", "origami", "thunder",
    "penguins", "fermentation", "satellites", "marathons", "the moon", "magnets", "deserts", "pottery", "rice farming",
]
PLAIN = ["It is a broad subject with a long history.", "Many people find it interesting to learn about.",
         "There is a lot to say about it.", "Scientists have studied it for many years."]
EXAMPLE = ["For example, {t} show up in everyday life in surprising ways.", "For instance, consider how {t} were first explained.",
           "A concrete example: a school project on {t} can teach the basics in a week."]


def keyword_pairs(seed: int = 0) -> list[PreferencePair]:
    """Users who (silently) prefer answers that give an example."""
    rng = random.Random(seed)
    pairs = []
    for topic in TOPICS:
        for _ in range(3):
            plain = f"{topic.capitalize()}: {rng.choice(PLAIN)} {rng.choice(PLAIN)}"
            example = f"{topic.capitalize()}: {rng.choice(PLAIN)} {rng.choice(EXAMPLE).format(t=topic)}"
            pairs.append(PreferencePair(f"Tell me about {topic}.", example, plain))
    return pairs


async def test_a_head_learns_the_hidden_preference_and_scores_the_same_in_guard(tmp_path: Path):
    pairs = keyword_pairs()
    out = tmp_path / "head.json"
    report = train_head(pairs, out, heldout_fraction=0.3)
    assert report.heldout_pairs > 10 and report.heldout_accuracy is not None and report.heldout_accuracy >= 0.9
    head, _ = load_head(str(out))
    assert head.training["heldout_accuracy"] == report.heldout_accuracy  # recorded in the artefact

    _, held = split(pairs, 0.3)
    reranker = Reranker(device="cpu")
    try:
        config = TrainedReward(type="trained", path=str(out))
        wins = 0
        for pair in held:
            chosen, rejected = await reranker.score(config, pair.prompt, [pair.chosen, pair.rejected])
            wins += chosen > rejected
    finally:
        await reranker.close()
    assert wins / len(held) == pytest.approx(report.heldout_accuracy)


def test_a_bad_head_file_names_itself(tmp_path: Path):
    bad = tmp_path / "head.json"
    bad.write_text(json.dumps({"format": "guard-classifier/1"}))
    with pytest.raises(ValueError, match=r"head.json: not a guard reward head"):
        load_head(str(bad))


async def test_a_sequence_classifier_fine_tune_fits_pairs_and_serves(tmp_path: Path, tiny_reward_dir: Path):
    pairs = keyword_pairs()[:60]
    out = tmp_path / "rm"
    report = train_sequence_classifier(pairs, tiny_reward_dir, out, epochs=4, learning_rate=1e-3, heldout_fraction=0.25)
    assert report.train_accuracy >= 0.9  # a random tiny model fits what it was shown
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["loss"] == "bradley-terry" and manifest["heldout_pairs"] == report.heldout_pairs
    reranker = Reranker(device="cpu")
    try:
        pair = pairs[0]
        scores = await reranker.score(SequenceClassifierReward(type="sequence_classifier", path=str(out)), pair.prompt, [pair.chosen, pair.rejected])
    finally:
        await reranker.close()
    assert len(scores) == 2


def test_the_cli_trains_a_head_and_says_how_to_use_it(tmp_path: Path, capsys):
    from guard.alignment.preferences import write_pairs
    from guard.cli import main

    write_pairs(keyword_pairs(), tmp_path / "prefs.jsonl")
    out = tmp_path / "head.json"
    assert main(["reward", "train", "--pairs", str(tmp_path / "prefs.jsonl"), "--out", str(out), "--heldout", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "held out 100.0%" in printed or "held out 9" in printed  # >= 90%
    assert f"reward: {{type: trained, path: {out}}}" in printed
    assert load_head(str(out))[0].training["heldout_pairs"] > 0


def test_the_cli_says_plainly_when_there_is_nothing_to_train_on(tmp_path: Path, capsys):
    from guard.cli import main

    empty = tmp_path / "prefs.jsonl"
    empty.write_text("")
    assert main(["reward", "train", "--pairs", str(empty), "--out", str(tmp_path / "head.json")]) == 1
    assert "no preference pairs" in capsys.readouterr().err
    assert main(["reward", "train", "--pairs", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "head.json")]) == 1
