"""Obfuscated spellings read the same as the plain request; ordinary text keeps its meaning."""

from __future__ import annotations

import pytest

from guard.safety.normalize import folded, plain, views


@pytest.mark.parametrize(
    "disguised",
    [
        "p i p e  b 0 m b",  # spelled out, leetspeak
        "ＰＩＰＥ ＢＯＭＢ",  # full-width
        "pi\u200bpe bo\u00admb",  # zero-width space, soft hyphen
        "pipe\tbomb",
        "PIPE     BOMB",
        "p.i.p.e b.o.m.b",
        "pipe b\u043emb",  # Cyrillic o
        "p1pe b0mb",
    ],
)
def test_disguised_spellings_fold_to_the_plain_words(disguised):
    assert "pipe bomb" in views(disguised)


def test_plain_view_only_removes_ways_of_writing_the_same_characters():
    assert plain("  Hello\u200b\n\nWORLD\x07 ") == "hello world"
    assert plain("python3 and c++") == "python3 and c++"


def test_folding_leaves_numbers_and_ordinary_words_alone():
    assert folded("Add 2 and 3 apples") == "add 2 and 3 apples"
    assert views("How do I kill a stuck process?") == ("how do i kill a stuck process?",)


def test_leetspeak_is_folded_only_inside_words_that_mix_letters_and_symbols():
    assert folded("h0w t0 m4k3 m3th, k!ll") == "how to make meth, kill"


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(st.text())
def test_normalising_any_text_is_stable(text):
    once = plain(text)
    assert plain(once) == once
    assert views(text)[0] == once


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=30), st.sampled_from(["\u200b", "\u00ad", "\u2060", "\ufeff"]))
def test_invisible_characters_between_letters_change_nothing(word, invisible):
    assert plain(invisible.join(word)) == word
