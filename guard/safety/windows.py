"""Overlapping word windows and sentences, so filler can neither push a request past an encoder's
length limit nor drown it out.

An encoder truncates at its max_seq_length (256 word pieces for MiniLM): whatever comes after is
never seen. Each text is cut into windows of `words` words that overlap by `words - stride`,
so every span of up to `words - stride` words lies whole inside some window.
"""

from __future__ import annotations

import re
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


def windows_since(text: str, *, words: int, since_word: int) -> list[str]:
    """Windows of `words` words that end at the text's end and step back by half a window until one
    starts at least half a window before word `since_word`: together they read every word from there
    on, and a phrase of up to half a window across that word is seen whole in one of them."""
    tokens = text.split()
    overlap = words // 2
    starts = [max(0, len(tokens) - words)]
    while starts[-1] > max(0, since_word - overlap):
        starts.append(max(0, starts[-1] - overlap))
    return [" ".join(tokens[start : start + words]) for start in reversed(starts)] if tokens else []


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


def segments(text: str, *, words: int, stride: int) -> list[str]:
    """What a classifier reads of one text: the text itself when it fits one window; otherwise each
    sentence on its own (a request hidden in filler is judged alone, not averaged with the filler)
    and overlapping word windows over the whole (a request that spans sentences, or has no punctuation)."""
    whole = windows(text, words=words, stride=stride)
    if len(whole) <= 1:
        return whole
    sentences = [piece for sentence in _SENTENCE_END.split(text) for piece in windows(sentence, words=words, stride=stride)]
    return list(dict.fromkeys([*sentences, *whole]))


def all_windows(texts: Sequence[str], *, words: int, stride: int, limit: int) -> list[str]:
    """Segments of every text, in the order given (callers put the newest message first)."""
    out: dict[str, None] = {}  # ordered set: a turn also read inside the joined conversation is encoded once
    for text in texts:
        out.update(dict.fromkeys(segments(text, words=words, stride=stride)))
        if len(out) > limit:
            raise TooManyWindows(f"input needs more than {limit} windows of {words} words")
    return list(out)
