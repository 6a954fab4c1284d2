"""Preference pairs in the JSON-lines format TRL's DPOTrainer and RewardTrainer read.

A pair is {"prompt": ..., "chosen": ..., "rejected": ...}. The prompt is a string
(a raw prompt) or a list of chat messages (TRL's conversational format); chosen
and rejected are strings, or a one-message assistant list in conversational
files. Held-out splits are by prompt, so no held-out prompt was seen in training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from guard.types import Message


@dataclass(frozen=True)
class PreferencePair:
    prompt: str | tuple[Message, ...]
    chosen: str
    rejected: str

    def prompt_key(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return json.dumps([[m.role, m.content] for m in self.prompt])

    def to_json(self) -> dict:
        if isinstance(self.prompt, str):
            return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        return {
            "prompt": [{"role": m.role, "content": m.content} for m in self.prompt],
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


def _reply(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    raise ValueError(f"{where}: expected a string or a list of messages ending with the reply")


def read_pairs(path: Path) -> list[PreferencePair]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
            prompt = record["prompt"]
            chosen, rejected = _reply(record["chosen"], f"{where}: chosen"), _reply(record["rejected"], f"{where}: rejected")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{where}: expected a JSON object with prompt, chosen and rejected ({exc})") from None
        if isinstance(prompt, list):
            try:
                prompt = tuple(Message(str(m["role"]), str(m["content"])) for m in prompt)
            except (KeyError, TypeError):
                raise ValueError(f"{where}: prompt messages need role and content") from None
        elif not isinstance(prompt, str):
            raise ValueError(f"{where}: prompt must be a string or a list of messages")
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


def write_pairs(pairs: Iterable[PreferencePair], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for pair in pairs:
            out.write(json.dumps(pair.to_json(), ensure_ascii=False) + "\n")
            count += 1
    return count


def dedup(pairs: Iterable[PreferencePair]) -> list[PreferencePair]:
    """First of each (prompt, chosen, rejected); a pair and its reverse both stay (users disagreed)."""
    seen: set[tuple[str, str, str]] = set()
    kept = []
    for pair in pairs:
        key = (pair.prompt_key(), pair.chosen, pair.rejected)
        if key not in seen and pair.chosen != pair.rejected:
            seen.add(key)
            kept.append(pair)
    return kept


def heldout(pair: PreferencePair, fraction: float, seed: int = 0) -> bool:
    """Whether the pair's prompt falls in the held-out share (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}:{pair.prompt_key()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(pairs: list[PreferencePair], fraction: float, seed: int = 0) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out), by prompt."""
    train, held = [], []
    for pair in pairs:
        (held if heldout(pair, fraction, seed) else train).append(pair)
    return train, held
