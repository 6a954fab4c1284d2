"""Preference pairs from the audit log and the feedback stored beside it (`guard export preferences`).

Every pair is built from text guard itself recorded (the prompt, the answers and best_of_n candidates
it generated, under `audit: {text: full}`), never from text a client sends back, except a correction,
which is the user's own answer. Sources, per answer (a record's choice):

  preferred   best_of_n with a preferred_index: the preferred candidate over every other candidate that
              was not refused;
  correction  the correction over the answer guard gave; a correction of a *refusal* is left out unless
              asked for (corrections_of_refusals): it may be exactly the text the policy refused;
  ratings     answers to the same prompt (same prompt text, or same conversation), the higher-rated over
              the lower-rated: thumbs up over thumbs down, and 1-5 ratings among themselves (the two
              scales are not compared); an answer rated several times counts with its mean;
  rewards     optional (from_rewards=MARGIN): best_of_n records without any feedback, the highest-scored
              candidate over the lowest-scored one when their reward scores differ by at least MARGIN
              (the reward model teaching its successor: useful to keep what it knew, not a human signal).

A record can have several feedbacks; for each answer the newest of each kind counts (a user who changed
their mind). Pairs are deduplicated (the first source keeps a pair: preferred, correction, ratings,
rewards), then split by prompt into training and held-out pairs with guard.alignment.preferences.split.
The output is what `guard reward train --pairs` (and TRL's DPOTrainer / RewardTrainer) reads.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.alignment.preferences import PreferencePair, dedup, split, write_pairs
from guard.audit import AuditQuery, AuditRecord, AuditStore, ChoiceRecord, Feedback, SQLiteAuditStore
from guard.types import Message

SOURCES = ("preferred", "correction", "ratings", "rewards")


@dataclass
class ExportReport:
    pairs: list[PreferencePair]  # every pair kept (deduplicated): train + heldout
    train: list[PreferencePair]
    heldout: list[PreferencePair]
    by_source: dict[str, int]  # pairs kept per source (SOURCES)
    records: int  # records read
    skipped: dict[str, int] = field(default_factory=dict)  # what gave no pair, by reason
    pairs_written: int = 0  # training pairs written to `out`
    heldout_written: int = 0  # held-out pairs written to `heldout_out`


def export_preferences(
    store_or_db_path: AuditStore | str | Path,
    out: str | Path | None = None,
    *,
    heldout: float = 0.0,
    heldout_out: str | Path | None = None,
    policy: str | None = None,
    since: float | None = None,
    until: float | None = None,
    tenant: str | None = None,
    from_rewards: float | None = None,
    corrections_of_refusals: bool = False,
    seed: int = 0,
) -> ExportReport:
    """Pairs from the records matching policy/since/until/tenant (unix seconds; None: any). Writes the training
    pairs to `out` and the held-out ones (`heldout`: the share of prompts held out) to `heldout_out` when given.

    Raises FileNotFoundError (no database at the path), ValueError (heldout out of range, or held out with
    nowhere to write them).
    """
    if not 0.0 <= heldout < 1.0:
        raise ValueError(f"heldout: must be >= 0 and < 1 (got {heldout})")
    if heldout and out is not None and heldout_out is None:
        raise ValueError("heldout_out: held-out pairs need a file of their own")
    if from_rewards is not None and from_rewards < 0:
        raise ValueError(f"from_rewards: the margin must be >= 0 (got {from_rewards})")
    store = SQLiteAuditStore(Path(store_or_db_path)) if isinstance(store_or_db_path, (str, Path)) else store_or_db_path
    query = AuditQuery(
        since=since, until=until, policy=policy, tenant=tenant, newest_first=False,
        feedback=True if from_rewards is None else None,  # without reward pairs, only records with feedback matter
    )
    builder = _Builder(from_rewards, corrections_of_refusals)
    for record, feedback in store.query_with_feedback(query):
        builder.add(record, feedback)
    tagged = builder.tagged()
    source_of = {id(pair): source for pair, source in tagged}
    kept = dedup(pair for pair, _ in tagged)
    by_source = Counter(source_of[id(pair)] for pair in kept)
    train, held = split(kept, heldout, seed) if heldout else (kept, [])
    report = ExportReport(
        pairs=kept, train=train, heldout=held, by_source={source: by_source[source] for source in SOURCES},
        records=builder.records, skipped=dict(builder.skipped),
    )
    if out is not None:
        report.pairs_written = write_pairs(train, Path(out))
    if heldout_out is not None:
        report.heldout_written = write_pairs(held, Path(heldout_out))
    return report


def _prompt(value: Any) -> str | tuple[Message, ...]:
    if isinstance(value, str):
        return value
    return tuple(Message(m["role"], m["content"]) for m in value)


@dataclass
class _Latest:
    """The newest feedback of each kind on one answer."""

    thumbs: bool | None = None
    rating: int | None = None
    preferred_index: int | None = None
    correction: str | None = None


def _latest(feedback: Iterable[Feedback]) -> dict[int, _Latest]:
    latest: dict[int, _Latest] = defaultdict(_Latest)
    for item in feedback:  # oldest first: later ones overwrite
        answer = latest[item.choice]
        for name in ("thumbs", "rating", "preferred_index", "correction"):
            value = getattr(item, name)
            if value is not None:
                setattr(answer, name, value)
    return latest


class _Builder:
    def __init__(self, from_rewards: float | None, corrections_of_refusals: bool) -> None:
        self.from_rewards = from_rewards
        self.corrections_of_refusals = corrections_of_refusals
        self.records = 0
        self.skipped: Counter[str] = Counter()
        self.by_source: dict[str, list[PreferencePair]] = {source: [] for source in SOURCES}
        # (prompt key, scale) -> answer text -> (prompt, the values it was rated)
        self.rated: dict[tuple[str, str], dict[str, tuple[str | tuple[Message, ...], list[float]]]] = defaultdict(dict)

    def add(self, record: AuditRecord, feedback: tuple[Feedback, ...]) -> None:
        self.records += 1
        if record.text != "full" or record.input is None:
            self.skipped["records without text (their policy's audit.text is not full)"] += 1
            return
        prompt = _prompt(record.input)
        latest = _latest(feedback)
        for index, choice in enumerate(record.choices):
            given = latest.get(index)
            if given is not None:
                self._preferred(prompt, choice, given)
                self._correction(prompt, choice, given)
                self._rating(prompt, choice, given)
        if not feedback and self.from_rewards is not None:
            for choice in record.choices:
                self._rewards(prompt, choice)

    def _preferred(self, prompt, choice: ChoiceRecord, given: _Latest) -> None:
        if given.preferred_index is None:
            return
        shown = {c.index: c.text for c in choice.candidates if not c.refused_by and c.text is not None}
        preferred = shown.get(given.preferred_index)
        if preferred is None:
            self.skipped["preferred candidates not in the record"] += 1
            return
        for index, text in shown.items():
            if index != given.preferred_index:
                self.by_source["preferred"].append(PreferencePair(prompt, preferred, text))

    def _correction(self, prompt, choice: ChoiceRecord, given: _Latest) -> None:
        if given.correction is None or choice.output is None:
            return
        if choice.refusal is not None and not self.corrections_of_refusals:
            self.skipped["corrections of refusals"] += 1
            return
        self.by_source["correction"].append(PreferencePair(prompt, given.correction, choice.output))

    def _rating(self, prompt, choice: ChoiceRecord, given: _Latest) -> None:
        if choice.output is None:
            return
        key = PreferencePair(prompt, "", "").prompt_key()
        for scale, value in (("thumbs", given.thumbs), ("rating", given.rating)):
            if value is not None:
                answers = self.rated[(key, scale)]
                answers.setdefault(choice.output, (prompt, []))[1].append(float(value))

    def _rewards(self, prompt, choice: ChoiceRecord) -> None:
        scored = [c for c in choice.candidates if not c.refused_by and c.text is not None and c.score is not None]
        if len(scored) < 2:
            return
        best = max(scored, key=lambda c: c.score)
        worst = min(scored, key=lambda c: c.score)
        assert self.from_rewards is not None and best.score is not None and worst.score is not None
        if best.score - worst.score >= self.from_rewards:
            self.by_source["rewards"].append(PreferencePair(prompt, best.text, worst.text))
        else:
            self.skipped["reward gaps below the margin"] += 1

    def _rating_pairs(self) -> list[PreferencePair]:
        pairs = []
        for answers in self.rated.values():
            means = [(sum(values) / len(values), text, prompt) for text, (prompt, values) in answers.items()]
            for high, chosen, prompt in means:
                for low, rejected, _ in means:
                    if high > low:
                        pairs.append(PreferencePair(prompt, chosen, rejected))
        return pairs

    def tagged(self) -> list[tuple[PreferencePair, str]]:
        self.by_source["ratings"] = self._rating_pairs()
        return [(pair, source) for source in SOURCES for pair in self.by_source[source]]
