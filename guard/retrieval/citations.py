"""Citations in an answer: `[1]`, `[1, 3]`, `[1][3]` name numbered sources."""

from __future__ import annotations

import re

_CITATION = re.compile(r"\[\s*(\d{1,3}(?:\s*[,;]\s*\d{1,3})*)\s*\]")


def cited_numbers(text: str) -> list[int]:
    """The source numbers the text cites, in order of first citation."""
    numbers: dict[int, None] = {}
    for match in _CITATION.finditer(text):
        for part in re.split(r"[,;]", match.group(1)):
            numbers[int(part)] = None
    return list(numbers)


def without_citations(text: str) -> str:
    """The text with its citation marks removed (they are not what a sentence says)."""
    return " ".join(_CITATION.sub(" ", text).split())
