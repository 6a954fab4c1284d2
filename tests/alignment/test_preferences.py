"""Preference pairs: TRL's JSON-lines formats in and out, dedup, and a held-out split by prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guard.alignment.preferences import PreferencePair, dedup, read_pairs, split, write_pairs
from guard.types import Message


def test_standard_and_conversational_pairs_round_trip(tmp_path: Path):
    pairs = [
        PreferencePair("Name a colour.", "Blue.", "I like turtles."),
        PreferencePair((Message("system", "Be brief."), Message("user", "Hi?")), "Hello!", "..."),
    ]
    path = tmp_path / "prefs.jsonl"
    assert write_pairs(pairs, path) == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # TRL's conversational format: messages for the prompt, one assistant message for each reply.
    assert lines[1]["prompt"][1] == {"role": "user", "content": "Hi?"}
    assert lines[1]["chosen"] == [{"role": "assistant", "content": "Hello!"}]
    assert read_pairs(path) == pairs


def test_a_bad_line_names_file_and_line(tmp_path: Path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=r"prefs.jsonl:2: expected a JSON object with prompt, chosen and rejected"):
        read_pairs(path)


def test_dedup_keeps_first_and_disagreements_but_drops_ties():
    a = PreferencePair("q", "x", "y")
    assert dedup([a, a, PreferencePair("q", "y", "x"), PreferencePair("q", "z", "z")]) == [a, PreferencePair("q", "y", "x")]


def test_heldout_split_is_by_prompt_and_stable():
    pairs = [PreferencePair(f"question {i}", f"good {j}", f"bad {j}") for i in range(200) for j in range(3)]
    train, held = split(pairs, 0.25)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held})
    assert 0.15 < len(held) / len(pairs) < 0.35
    assert split(pairs, 0.25) == (train, held)
