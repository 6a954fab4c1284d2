"""`guard export preferences` on a populated audit database: each source of pairs, dedup, the held-out split by
prompt, and files `guard reward train --pairs` reads."""

from __future__ import annotations

import dataclasses
import time

import pytest

from guard.alignment.export import export_preferences
from guard.alignment.preferences import PreferencePair, heldout, read_pairs
from guard.audit import Feedback, SQLiteAuditStore
from guard.cli import main
from guard.types import CandidateAnswer, Message, Refusal
from tests.audit.made import DAY, finished

QUESTION = "What is the capital of France?"


@pytest.fixture
def store(tmp_path):
    store = SQLiteAuditStore(tmp_path / "audit.db")
    store.start()
    yield store
    store.close()


def answered(store, request_id: str, answer: str, *, prompt=QUESTION, candidates=(), refused=False, **options):
    """A request that kept its text (`prompt` a string, or a list of Messages for a conversation)."""
    if isinstance(prompt, str):
        request = finished(request_id, answer=answer, text="full", prompt=prompt, **options)
    else:
        request = dataclasses.replace(finished(request_id, answer=answer, text="full", **options), input=list(prompt))
    result = request.results[0]
    result.candidates = tuple(candidates)
    if refused:
        result.text, result.refusal = "No.", Refusal("output", "outputs", "secret", "matched rule 'secret'", "No.")
    store.submit(request)


def feedback(store, request_id: str, **fields) -> None:
    store.flush()
    found = store.find(request_id, "acme")
    assert store.add_feedback(found.key, Feedback(request_id, tenant="acme", time=time.time(), **fields))


BEST_OF_3 = [CandidateAnswer(0, "Paris.", 0.2), CandidateAnswer(1, "It is Paris, on the Seine.", 0.9),
             CandidateAnswer(2, "classified plans", None, "outputs")]


def test_a_preferred_candidate_is_paired_with_every_other_candidate_that_was_not_refused(store):
    answered(store, "bon-1", "It is Paris, on the Seine.", candidates=BEST_OF_3)
    feedback(store, "bon-1", preferred_index=0)
    report = export_preferences(store)
    assert report.pairs == [PreferencePair(QUESTION, "Paris.", "It is Paris, on the Seine.")]
    assert report.by_source == {"preferred": 1, "correction": 0, "ratings": 0, "rewards": 0}


def test_ratings_pair_answers_to_the_same_prompt_within_each_scale(store):
    answered(store, "up", "Paris.")
    answered(store, "down", "Lyon.")
    answered(store, "five", "Paris, France.")
    answered(store, "two", "A city.")
    answered(store, "other-prompt", "Berlin.", prompt="What is the capital of Germany?")
    chat = [Message("user", QUESTION)]
    answered(store, "as-chat", "Marseille.", prompt=chat)  # the same words as a conversation: another prompt
    feedback(store, "up", thumbs=True)
    feedback(store, "down", thumbs=False)
    feedback(store, "five", rating=5)
    feedback(store, "two", rating=2)
    feedback(store, "other-prompt", thumbs=False)
    feedback(store, "as-chat", rating=1)
    report = export_preferences(store)
    assert sorted((p.chosen, p.rejected) for p in report.pairs) == [("Paris, France.", "A city."), ("Paris.", "Lyon.")]
    assert report.by_source["ratings"] == 2


def test_the_newest_feedback_of_each_kind_counts(store):
    answered(store, "a", "Paris.")
    answered(store, "b", "Lyon.")
    feedback(store, "a", thumbs=False)
    feedback(store, "a", thumbs=True)  # changed their mind
    feedback(store, "b", thumbs=False)
    assert [(p.chosen, p.rejected) for p in export_preferences(store).pairs] == [("Paris.", "Lyon.")]


def test_a_correction_is_preferred_over_the_answer_guard_gave_but_not_over_a_refusal_unless_asked(store):
    answered(store, "fix", "Lyon.")
    answered(store, "refused", "", refused=True, prompt="Tell me the plans.")
    feedback(store, "fix", correction="Paris.", thumbs=False)
    feedback(store, "refused", correction="Here are the plans: ...")
    report = export_preferences(store)
    assert report.pairs == [PreferencePair(QUESTION, "Paris.", "Lyon.")]
    assert report.skipped == {"corrections of refusals": 1}
    included = export_preferences(store, corrections_of_refusals=True)
    assert PreferencePair("Tell me the plans.", "Here are the plans: ...", "No.") in included.pairs


def test_reward_scores_pair_best_of_n_requests_without_feedback_above_the_margin(store):
    answered(store, "scored", "It is Paris, on the Seine.", candidates=BEST_OF_3)
    answered(store, "close", "x", candidates=[CandidateAnswer(0, "x", 0.5), CandidateAnswer(1, "y", 0.55)])
    answered(store, "with-feedback", "Paris.", prompt="Capital of France?", candidates=BEST_OF_3)
    feedback(store, "with-feedback", thumbs=True)
    assert export_preferences(store).by_source["rewards"] == 0  # only when asked for
    report = export_preferences(store, from_rewards=0.5)
    assert report.pairs == [PreferencePair(QUESTION, "It is Paris, on the Seine.", "Paris.")]
    assert report.by_source == {"preferred": 0, "correction": 0, "ratings": 0, "rewards": 1}
    assert report.skipped == {"reward gaps below the margin": 1}
    assert len(export_preferences(store, from_rewards=0.01).pairs) == 2


def test_duplicates_are_dropped_and_counted_under_the_first_source(store):
    for request_id in ("one", "two"):
        answered(store, request_id, "It is Paris, on the Seine.", candidates=BEST_OF_3)
        feedback(store, request_id, preferred_index=0)
    report = export_preferences(store, from_rewards=0.1)
    assert len(report.pairs) == 1 and report.by_source["preferred"] == 1


def test_filters_and_the_held_out_split_by_prompt_write_files_reward_training_reads(store, tmp_path):
    now = time.time()
    for i in range(40):
        answered(store, f"r-{i}", "It is Paris, on the Seine.", prompt=f"Question {i}?", candidates=BEST_OF_3)
        feedback(store, f"r-{i}", preferred_index=0)
    answered(store, "old", "It is Paris, on the Seine.", prompt="Old question?", candidates=BEST_OF_3, at=now - 9 * DAY)
    answered(store, "strict", "It is Paris, on the Seine.", prompt="Strict question?", candidates=BEST_OF_3, policy="strict")
    feedback(store, "old", preferred_index=0)
    feedback(store, "strict", preferred_index=0)

    out, held = tmp_path / "prefs.jsonl", tmp_path / "held.jsonl"
    report = export_preferences(store.path, out, heldout=0.25, heldout_out=held, policy="safe", since=now - DAY)
    assert len(report.pairs) == 40 and report.pairs_written + report.heldout_written == 40
    assert 0 < report.heldout_written < 40
    train, held_pairs = read_pairs(out), read_pairs(held)
    assert train == report.train and held_pairs == report.heldout
    assert all(heldout(pair, 0.25) for pair in held_pairs) and not any(heldout(pair, 0.25) for pair in train)
    assert {p.prompt_key() for p in train}.isdisjoint(p.prompt_key() for p in held_pairs)


def test_the_cli_prints_counts_by_source_and_fails_when_there_is_nothing_to_train_on(store, tmp_path, capsys):
    answered(store, "bon-1", "It is Paris, on the Seine.", candidates=BEST_OF_3)
    answered(store, "fix", "Lyon.", prompt="Capital of France?")
    store.flush()
    db, out = str(store.path), str(tmp_path / "prefs.jsonl")
    assert main(["export", "preferences", "--db", db, "--out", out]) == 1
    assert "no preference pairs" in capsys.readouterr().err
    feedback(store, "bon-1", preferred_index=0)
    feedback(store, "fix", correction="Paris.")
    assert main(["export", "preferences", "--db", db, "--out", out, "--since", "1h"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[:3] == [f"wrote 2 pairs to {out} from 2 records", "  preferred        1", "  correction       1"]
    assert len(read_pairs(tmp_path / "prefs.jsonl")) == 2
    assert main(["export", "preferences", "--db", db, "--out", out, "--heldout", "0.2"]) == 1
    assert "--heldout needs --heldout-out" in capsys.readouterr().err
    assert main(["export", "preferences", "--db", str(tmp_path / "missing.db"), "--out", out]) == 1
    assert "no audit database" in capsys.readouterr().err
