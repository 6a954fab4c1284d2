"""The runner over a scripted upstream: one request path, streamed or collected, and streaming moderation."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml

from guard import metrics
from guard.pipeline.base import StepDeps
from guard.pipeline.runner import Pipeline, TextDelta
from guard.policy.loader import LoadedPolicy
from guard.policy.model import Policy
from guard.types import Choice, Completion, GenerateInput, GenerateResult, Message, Sampling, StreamDelta

SECRET = "hunter2"


class ScriptedUpstream:
    """Streams the given chunks (each with its token count so far, as vLLM's continuous usage does);
    unary calls answer every one of the n choices with `whole` (default: the chunks joined)."""

    def __init__(self, chunks: list[str], *, whole: list[str] | None = None) -> None:
        self.chunks = chunks
        self.whole = whole
        self.calls: list[dict[str, Any]] = []
        self.sent = 0  # chunks handed out so far
        self.aborted = False  # closed (aclose) before the last chunk
        self.finished = False

    def generate(
        self, model, *, prompt=None, messages=None, sampling, stream, timeout=None, continue_final_message=False, request_id=None
    ):
        assert (prompt is None) != (messages is None)
        self.calls.append(dict(prompt=prompt, messages=messages, sampling=sampling, stream=stream, timeout=timeout, request_id=request_id))
        return self._stream() if stream else self._unary(sampling)

    async def _stream(self) -> AsyncIterator[StreamDelta]:
        try:
            for i, chunk in enumerate(self.chunks):
                self.sent += 1
                yield StreamDelta(0, "", prompt_tokens=3, completion_tokens=i + 1, upstream_url="http://fake")
                yield StreamDelta(0, chunk)
            yield StreamDelta(0, "", finish_reason="length")
            self.finished = True
        except GeneratorExit:
            self.aborted = True
            raise

    async def _unary(self, sampling: Sampling) -> Completion:
        texts = self.whole or ["".join(self.chunks)] * sampling.n
        choices = tuple(Choice(i, text, "length") for i, text in enumerate(texts))
        return Completion(choices, 3, len(self.chunks) * len(texts), "m", "http://fake")


class LengthReranker:
    """best_of_n's reward source, faked: longer is better."""

    class observer:
        @staticmethod
        def chosen(policy: str, score: float) -> None:
            pass

    async def score(self, config, prompt, texts, *, timeout=None) -> list[float]:
        return [float(len(t)) for t in texts]

    def select(self, scores, penalties, *, rule, tau, normalize, seed) -> list[int]:
        return [max(range(len(row)), key=lambda i: row[i] - pen[i]) for row, pen in zip(scores, penalties, strict=True)]


def pipeline(steps_yaml: str, upstream: ScriptedUpstream, name: str = "t") -> Pipeline:
    policy = Policy.model_validate({"name": name, "refusal": "No.", "steps": yaml.safe_load(steps_yaml) or []})
    loaded = LoadedPolicy(policy=policy, version="v1", source=None)  # type: ignore[arg-type]
    return Pipeline(loaded, StepDeps(upstream=upstream, reranker=LengthReranker(), default_model="m"))  # type: ignore[arg-type]


def output_filter(holdback: int, every: int, keyword: str = SECRET) -> str:
    return f"""
- type: output_filter
  stream_holdback_chars: {holdback}
  stream_check_every_chars: {every}
  rules: [{{name: secret, keywords: ['{keyword}']}}]
"""


CHAT = GenerateInput(messages=[Message("user", "tell me")])


async def collect(pipe: Pipeline, request: GenerateInput = CHAT) -> tuple[list[str], GenerateResult]:
    pieces, final = [], None
    async for event in pipe.stream(request):
        if isinstance(event, TextDelta):
            assert final is None, "no text after the final result"
            pieces.append(event.text)
        else:
            final = event
    assert isinstance(final, GenerateResult)
    return pieces, final


def sample(name: str, policy: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, {"policy": policy}) or 0.0


def words_chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


async def test_a_phrase_split_across_chunks_is_caught_and_the_upstream_is_closed():
    chunks = ["Sure. The password you asked for is hun", "ter2, and here", " is a long tail", " that never comes"] * 3
    upstream = ScriptedUpstream(chunks)
    exposed_count, exposed_sum = sample("guard_stream_exposed_chars_count", "split"), sample("guard_stream_exposed_chars_sum", "split")

    pieces, final = await collect(pipeline(output_filter(holdback=16, every=8), upstream, name="split"))

    assert final.finish_reason == "refused" and final.text == "No."
    assert (final.refusal.stage, final.refusal.rule) == ("output", "secret")
    released = "".join(pieces)
    assert "".join(chunks).startswith(released)
    assert len(released) <= "".join(chunks).index(SECRET)  # nothing of the phrase went out
    # The upstream stream was closed mid-way (vLLM aborts), not drained.
    assert upstream.aborted and not upstream.finished and upstream.sent < len(chunks)
    assert final.usage.completion_tokens == upstream.sent  # usage as far as vLLM got
    assert sample("guard_stream_exposed_chars_count", "split") == exposed_count + 1
    assert sample("guard_stream_exposed_chars_sum", "split") == exposed_sum + len(released)
    [checks] = [entry for entry in final.trace if entry.type == "output_filter"]
    assert checks.phase == "after" and checks.detail["checks"] >= 2


@pytest.mark.parametrize("seed", range(40))
async def test_no_part_of_a_match_is_released_when_holdback_covers_it(seed):
    rng = random.Random(seed)
    filler = "the quick brown fox jumps over the lazy dog and keeps running far away "
    text = filler * rng.randint(0, 4) + filler[: rng.randint(0, len(filler))] + " " + SECRET + " " + filler * 3
    chunks, i = [], 0
    while i < len(text):
        step = rng.randint(1, 12)
        chunks.append(text[i : i + step])
        i += step
    holdback = len(SECRET) + rng.randint(0, 8)
    upstream = ScriptedUpstream(chunks)
    pieces, final = await collect(pipeline(output_filter(holdback=holdback, every=rng.randint(1, 20)), upstream))
    assert final.refusal is not None and final.refusal.rule == "secret"
    released = "".join(pieces)
    assert text.startswith(released)
    assert len(released) <= text.index(SECRET), "part of the matched phrase reached the client"


async def test_without_a_block_everything_is_released_and_text_flows_before_the_upstream_ends():
    chunks = words_chunks("A perfectly harmless story about a walk in the park on a sunny day. " * 4, 5)
    upstream = ScriptedUpstream(chunks)
    pipe = pipeline(output_filter(holdback=24, every=8), upstream)
    first_delta_sent = None
    pieces, final = [], None
    async for event in pipe.stream(CHAT):
        if isinstance(event, TextDelta):
            first_delta_sent = upstream.sent if first_delta_sent is None else first_delta_sent
            pieces.append(event.text)
        else:
            final = event
    assert final.refusal is None and final.finish_reason == "length"
    assert "".join(pieces) == final.text == "".join(chunks)
    assert first_delta_sent is not None and first_delta_sent < len(chunks)  # not buffered to the end
    assert 1 < len(pieces) < len(chunks)  # released in windows, not token by token
    assert upstream.finished and not upstream.aborted
    assert final.usage.completion_tokens == len(chunks) and final.upstream_url == "http://fake"


async def test_a_block_on_the_last_check_releases_nothing_more():
    upstream = ScriptedUpstream(["short answer: ", SECRET])
    pieces, final = await collect(pipeline(output_filter(holdback=64, every=32), upstream))
    assert pieces == [] and final.refusal is not None
    assert upstream.finished  # nothing left to abort: the match was only seen at the end


async def test_passthrough_streams_every_chunk_as_it_comes():
    chunks = ["Once", " upon", " a", " time"]
    pieces, final = await collect(pipeline("[]", ScriptedUpstream(chunks)))
    assert pieces == chunks and final.text == "Once upon a time"


async def test_input_refusal_never_calls_the_upstream_and_sends_no_text():
    upstream = ScriptedUpstream(["never"])
    pipe = pipeline("[{type: input_filter, rules: [{name: r, keywords: [forbidden]}]}]", upstream)
    pieces, final = await collect(pipe, GenerateInput(messages=[Message("user", "something forbidden")]))
    assert pieces == [] and final.text == "No." and final.refusal.stage == "input"
    assert upstream.calls == []
    assert (await pipe.run(GenerateInput(messages=[Message("user", "something forbidden")]))).text == "No."


COT = "[{type: chain_of_thought, marker: 'ANSWER:'}]"
BEST_OF_N = "- {type: best_of_n, n: 3, reward: {type: embedding}}\n"
POLICIES = {
    "passthrough": ("[]", None),
    "system_prompt": ("[{type: system_prompt, content: Be brief.}]", None),
    "input_filter": ("[{type: input_filter, rules: [{name: r, keywords: [forbidden]}]}]", None),
    "output_filter": (output_filter(holdback=8, every=4), None),
    "output_filter_blocks": (output_filter(holdback=8, every=4, keyword="meadow"), None),
    "chain_of_thought": (COT, None),
    "best_of_n": (BEST_OF_N, ["a short one", "the longest candidate of all", "medium length"]),
    "best_of_n_filtered": (
        output_filter(holdback=8, every=4, keyword="longest") + BEST_OF_N,
        ["a short one", "the longest candidate of all", "medium length"],
    ),
}


@pytest.mark.parametrize("kind", POLICIES)
@pytest.mark.parametrize("request_", [CHAT, GenerateInput(prompt="Once upon")], ids=["chat", "prompt"])
async def test_unary_is_the_collected_stream(kind, request_):
    steps, whole = POLICIES[kind]
    chunks = ["We walked ", "through the ", "meadow. ANSWER:", " it was green"]
    pieces, streamed = await collect(pipeline(steps, ScriptedUpstream(chunks, whole=whole)), request_)
    unary = await pipeline(steps, ScriptedUpstream(chunks, whole=whole)).run(request_)
    assert (unary.text, unary.finish_reason, unary.refusal, unary.usage) == (
        streamed.text, streamed.finish_reason, streamed.refusal, streamed.usage
    )
    assert [(e.step, e.phase) for e in unary.trace] == [(e.step, e.phase) for e in streamed.trace]
    if streamed.refusal is None:
        assert "".join(pieces) == streamed.text


async def test_chain_of_thought_streams_only_the_final_answer():
    upstream = ScriptedUpstream(["Let me think. ", "Two and two. ", "ANSWER: 4"])
    pieces, final = await collect(pipeline(COT, upstream))
    assert pieces == ["4"] and final.text == "4"
    assert [call["stream"] for call in upstream.calls] == [False]  # needs the whole answer
    assert any(entry.type == "answer" and "reasoning" in entry.detail for entry in final.trace)


async def test_best_of_n_streams_the_chosen_candidate_from_one_call():
    upstream = ScriptedUpstream([], whole=["short", "the longest one wins", "middling"])
    pieces, final = await collect(pipeline(BEST_OF_N, upstream))
    assert pieces == ["the longest one wins"] and final.text == pieces[0]
    [call] = upstream.calls
    assert call["stream"] is False and call["sampling"].n == 3


async def test_best_of_n_output_filter_refuses_candidates_not_the_stream():
    upstream = ScriptedUpstream([], whole=["short", "the longest one wins", "middling"])
    pieces, final = await collect(pipeline(output_filter(8, 4, keyword="longest") + BEST_OF_N, upstream))
    assert pieces == ["middling"] and final.refusal is None


async def test_the_deadline_becomes_the_upstream_timeout():
    import time

    upstream = ScriptedUpstream(["hi"])
    pipe = pipeline("[]", upstream)
    async for _ in pipe.stream(CHAT, deadline=time.monotonic() + 30):
        pass
    assert 0 < upstream.calls[0]["timeout"] <= 30


async def test_a_unary_block_exposes_nothing():
    upstream = ScriptedUpstream(["A long enough preamble before it: ", SECRET, " and more"] * 4)
    count = sample("guard_stream_exposed_chars_count", "unary")
    result = await pipeline(output_filter(holdback=8, every=4), upstream, name="unary").run(CHAT)
    assert result.refusal is not None and result.text == "No."
    assert upstream.aborted  # a unary answer stops the generation early too
    assert sample("guard_stream_exposed_chars_count", "unary") == count  # nothing reached a client


@pytest.mark.parametrize("position", [0, 300, 1200])
async def test_a_phrase_deep_inside_one_big_chunk_is_caught_before_any_of_it_is_sent(position):
    """A fast upstream's events arrive together and are coalesced into one chunk: every word of it
    is read, not only the newest window, before anything is released."""
    filler = " ".join(f"word{i}" for i in range(400))  # ~3,500 characters: many windows long
    text = filler[:position] + f" {SECRET} " + filler[position:]
    upstream = ScriptedUpstream(["Sure.", text, " and the end."])
    pieces, final = await collect(pipeline(output_filter(holdback=16, every=8), upstream, name="big-chunk"))
    assert final.refusal is not None and final.refusal.rule == "secret"
    assert SECRET not in "".join(pieces)
    assert len("".join(pieces)) <= len("Sure.") + position + 1
