"""Overlapping word windows, so filler cannot push a request past an encoder's length limit.

An encoder truncates at its max_seq_length (256 word pieces for MiniLM): whatever comes after is
never seen. Each text is cut into windows of `words` words that overlap by `words - stride`,
so every span of up to `words - stride` words lies whole inside some window.
"""

from __future__ import annotations

from collections.abc import Sequence


class TooManyWindows(Exception):
    """The input needs more windows than the rule's budget; the filter's fail mode decides."""


def windows(text: str, *, words: int, stride: int) -> list[str]:
    tokens = text.split()
    if len(tokens) <= words:
        return [" ".join(tokens)] if tokens else []
    starts = list(range(0, len(tokens) - words + 1, stride))
    if starts[-1] + words < len(tokens):
        starts.append(len(tokens) - words)  # the tail gets a window of its own
    return [" ".join(tokens[start : start + words]) for start in starts]


def all_windows(texts: Sequence[str], *, words: int, stride: int, limit: int) -> list[str]:
    """Windows of every text, in the order given (callers put the newest message first)."""
    out: list[str] = []
    for text in texts:
        out.extend(windows(text, words=words, stride=stride))
        if len(out) > limit:
            raise TooManyWindows(f"input needs more than {limit} windows of {words} words")
    return out
