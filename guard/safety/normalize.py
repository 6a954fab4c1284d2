"""Text normalisation for safety rules: the same request in disguise must read the same.

Two views of a text:
  - `plain(text)`: Unicode NFKC (full-width letters, ligatures), zero-width and control
    characters removed, case folded, whitespace runs collapsed. Safe for any rule: it only
    removes ways of writing the same characters differently.
  - `folded(text)`: `plain` plus obfuscation undone: Cyrillic/Greek look-alike letters mapped
    to Latin, letters spelled out one at a time ("p i p e", "b.o.m.b") joined, and
    leetspeak inside words that mix letters and digits ("b0mb", "h4ck") read as letters.
    It can damage legitimate text ("python3" becomes "pythone"), so rules match both views
    and a match in either one counts.
"""

from __future__ import annotations

import re
import unicodedata

# Format characters that render as nothing but split words for a matcher.
_INVISIBLE = dict.fromkeys(
    map(ord, "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200c\u200d\u200e\u200f"
        "\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\u206a\u206b\u206c\u206d"
        "\u206e\u206f\u3164\ufeff\uffa0"),
    None,
)
_WHITESPACE_RUN = re.compile(r"\s+")

# The look-alikes that survive NFKC: Cyrillic and Greek letters drawn like Latin ones.
_HOMOGLYPHS = str.maketrans(
    {
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
        "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "һ": "h",
        "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g", "ɑ": "a", "ο": "o", "α": "a", "ε": "e", "ι": "i",
        "κ": "k", "ν": "v", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "β": "b", "η": "n", "μ": "u",
        "ω": "w", "ς": "s",
    }
)
# Single characters separated by one separator each: "p i p e", "b.o.m.b", "k-i-l-l".
# Two or more spaces end a spelled-out word, so "p i p e  b o m b" becomes "pipe bomb".
_SPELLED_OUT = re.compile(r"(?<![^\W_])(?:[^\W_][ .\-_*/])+[^\W_](?![^\W_])")
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
                       "@": "a", "$": "s", "!": "i", "|": "l", "+": "t"})
_LEET_TOKEN = re.compile(r"[\w@$!|+]+")
_HAS_LETTER = re.compile(r"[^\W\d_]")


def _strip_invisible(text: str) -> str:
    text = text.translate(_INVISIBLE)
    # Other control characters (but not the whitespace ones, which separate words).
    return "".join(ch for ch in text if ch in "\t\n\r" or unicodedata.category(ch) != "Cc")


def plain(text: str) -> str:
    text = _strip_invisible(unicodedata.normalize("NFKC", text))
    return _WHITESPACE_RUN.sub(" ", text.casefold()).strip()


def _join_spelled_out(match: re.Match[str]) -> str:
    run = match.group(0)
    letters, separators = run[::2], run[1::2]
    usual = max(set(separators), key=separators.count)
    # In "b.o.m.b m.a.k.i.n.g" the lone space is a word break, not a letter separator.
    joined = letters[0] + "".join(
        (" " if sep == " " and usual != " " else "") + letter for letter, sep in zip(letters[1:], separators, strict=True)
    )
    # "a" and "i" are words: "a p i p e" is "a pipe", not "apipe".
    if usual == " " and letters[0] in "ai" and len(letters) > 3:
        joined = f"{letters[0]} {joined[1:]}"
    return joined


def _unleet(match: re.Match[str]) -> str:
    token = match.group(0)
    if not _HAS_LETTER.search(token) or token.isalpha():
        return token  # a number, or an ordinary word
    return token.translate(_LEET)


def folded(text: str) -> str:
    text = _strip_invisible(unicodedata.normalize("NFKC", text)).casefold().translate(_HOMOGLYPHS)
    text = _SPELLED_OUT.sub(_join_spelled_out, text)
    text = _WHITESPACE_RUN.sub(" ", text).strip()
    return _LEET_TOKEN.sub(_unleet, text)


def views(text: str) -> tuple[str, ...]:
    """The distinct views a rule should read: plain, and folded when it differs."""
    first = plain(text)
    second = folded(text)
    return (first,) if second == first else (first, second)
