"""Keyword and regex rules, compiled once and matched with a time budget.

The `regex` module rather than `re`: its search takes a timeout (a policy's regex or a
hostile input cannot pin a core), and with `concurrent=True` it releases the GIL, so a
long scan in the filter's worker thread does not stall the event loop.

Every rule is matched against each normalised view of the text (see normalize.py);
keywords are normalised the same way, so "p i p e  b 0 m b" meets the keyword "pipe bomb".
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import regex

from guard.safety.normalize import folded, plain

FLAGS = regex.IGNORECASE | regex.VERSION0


class PatternTimeout(Exception):
    """A rule did not finish matching within its time budget."""


def _keyword_pattern(keyword: str) -> str:
    # Any run of whitespace between a keyword's words still matches ("make  meth").
    escaped = regex.escape(keyword).replace(r"\ ", r"\s+")
    # Not `\b`: next to a keyword's own punctuation ("c++", ".onion") `\b` would demand a word
    # character, so the keyword could never match. No word character may touch either end instead.
    return rf"(?<!\w){escaped}(?!\w)"


def compile_rule(keywords: Sequence[str], regexes: Sequence[str]) -> regex.Pattern[str]:
    """One alternation for a rule: exactly what runs, so validation and runtime cannot disagree.

    Raises regex.error (e.g. an inline flag that is legal alone but not inside the alternation).
    """
    variants = dict.fromkeys(v for keyword in keywords for v in (plain(keyword), folded(keyword)) if v)
    alternatives = [_keyword_pattern(v) for v in variants]
    alternatives += [f"(?:{pattern})" for pattern in regexes]
    return regex.compile("|".join(alternatives), FLAGS)


@dataclass(frozen=True)
class CompiledRule:
    name: str
    pattern: regex.Pattern[str]


class PatternSet:
    """The pattern rules of one filter, in order."""

    def __init__(self, rules: Sequence[tuple[str, Sequence[str], Sequence[str]]], *, budget_seconds: float) -> None:
        self.rules = [CompiledRule(name, compile_rule(keywords, regexes)) for name, keywords, regexes in rules]
        self.budget_seconds = budget_seconds

    def __bool__(self) -> bool:
        return bool(self.rules)

    def first_match(self, views: Sequence[str]) -> str | None:
        """The name of the first rule that matches any view. Blocking: call it off the event loop."""
        for rule in self.rules:
            started = time.perf_counter()
            for view in views:
                remaining = self.budget_seconds - (time.perf_counter() - started)
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    if rule.pattern.search(view, concurrent=True, timeout=remaining):
                        return rule.name
                except TimeoutError:
                    raise PatternTimeout(
                        f"rule {rule.name!r} did not finish within {self.budget_seconds:g}s on {len(view)} characters"
                    ) from None
        return None
