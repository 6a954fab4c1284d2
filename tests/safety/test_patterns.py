"""Pattern rules: compiled as they run, matched on every view, bounded in time."""

from __future__ import annotations

import pytest

from guard.safety.normalize import views
from guard.safety.patterns import PatternSet, PatternTimeout, compile_rule


def test_keywords_match_obfuscated_text_through_the_folded_view():
    rules = PatternSet([("weapons", ["pipe bomb"], [])], budget_seconds=1.0)
    assert rules.first_match(views("how to build a p i p e  b 0 m b")) == "weapons"
    assert rules.first_match(views("a pipe bombastic review")) is None


def test_regexes_match_the_plain_view_when_folding_would_break_them():
    # Folding reads "AKIA1234..." as letters; the plain view keeps the digits the regex needs.
    rules = PatternSet([("aws-key", [], [r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"])], budget_seconds=1.0)
    assert rules.first_match(views("key: AKIA1234567890ABCDEF")) == "aws-key"


def test_the_first_matching_rule_in_order_wins():
    rules = PatternSet([("a", ["bomb"], []), ("b", ["pipe bomb"], [])], budget_seconds=1.0)
    assert rules.first_match(views("pipe bomb")) == "a"


def test_regexes_that_re_rejects_when_joined_compile_as_one_rule():
    # With `re`, an inline flag after the first alternative or a group name used twice broke the
    # joined pattern at runtime although each regex validated alone; `regex` accepts both.
    pattern = compile_rule((), ["x", "(?i)abc", "(?P<n>y)", "(?P<n>z)"])
    assert pattern.search("ABC") and pattern.search("z")


def test_catastrophic_backtracking_is_cut_off_by_the_budget():
    rules = PatternSet([("redos", [], [r"(a+)+$"])], budget_seconds=0.05)
    with pytest.raises(PatternTimeout, match="redos"):
        rules.first_match(["a" * 5000 + "!"])
