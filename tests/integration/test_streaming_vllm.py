"""GenerateStream end to end over the real tiny vLLM: every shipped policy streams, and an output
filter moderates the stream as it flows (text released early, a block aborts the generation)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guard.client import Answer, GuardClient
from tests.integration.test_grpc_vllm import metric, scrape, wait_for

pytestmark = pytest.mark.integration

SHIPPED = sorted(path.stem for path in (Path(__file__).resolve().parents[2] / "policies").glob("*.yaml"))
QUESTION = [("user", "What is the capital of France?")]
PROMPT = "The weather today"
LONG = 480  # tokens (of the 512 the tiny model's context holds): it never stops early under greedy, so this takes seconds


def split(events: list) -> tuple[list[str], Answer]:
    *pieces, final = events
    assert isinstance(final, Answer) and all(isinstance(piece, str) for piece in pieces)
    return pieces, final


def vllm_sum(vllm_server, name: str) -> float:
    return sum(value for (sample, _), value in scrape(f"{vllm_server.url}/metrics").items() if sample == name)


def add_policy(guard, policy_dir: Path, name: str, text: str) -> str:
    (policy_dir / f"{name}.yaml").write_text(text)
    assert wait_for(lambda: name in {p.name for p in guard.list_policies()}, timeout=5)
    return name


@pytest.mark.parametrize("policy", SHIPPED)
def test_every_shipped_policy_streams(guard, policy):
    pieces, final = split(list(guard.stream(QUESTION, policy=policy, max_tokens=24, seed=1, timeout=120)))
    assert final.policy == policy and final.finish_reason in ("stop", "length")
    assert not final.refused and final.completion_tokens > 0
    assert "".join(pieces) == final.text


@pytest.mark.parametrize("policy", [p for p in SHIPPED if p != "best-of-n"])  # best-of-n samples at its own temperature
def test_streamed_equals_unary_under_greedy(guard, policy):
    options = dict(policy=policy, max_tokens=24, temperature=0.0, timeout=120)
    unary = guard.generate(QUESTION, **options)
    pieces, final = split(list(guard.stream(QUESTION, **options)))
    assert "".join(pieces) == final.text == unary.text
    assert (final.finish_reason, final.completion_tokens) == (unary.finish_reason, unary.completion_tokens)


@pytest.fixture(scope="module")
def greedy_long_text(guard_server, policy_dir) -> str:
    with GuardClient(guard_server.target) as guard:
        add_policy(guard, policy_dir, "greedy-long", f"name: greedy-long\nsampling: {{temperature: 0.0, max_tokens: {LONG}}}\n")
        answer = guard.generate(PROMPT, policy="greedy-long", timeout=120)
    assert answer.finish_reason == "length" and answer.completion_tokens == LONG, "needs a generation that runs its course"
    return answer.text


def test_a_streamed_block_refuses_and_aborts_the_generation(guard, guard_server, vllm_server, policy_dir, greedy_long_text):
    # A word the model writes early on under greedy decoding: the filter must stop it there.
    word = next(w for w in re.findall(r"\b[A-Za-z]{4,12}\b", greedy_long_text) if greedy_long_text.index(w) < 200)
    add_policy(
        guard, policy_dir, "stream-block",
        f"name: stream-block\nsampling: {{temperature: 0.0, max_tokens: {LONG}}}\nrefusal: Filtered.\n"
        "steps:\n  - type: output_filter\n    stream_holdback_chars: 16\n    stream_check_every_chars: 8\n"
        f"    rules: [{{name: the-word, regex: ['{word}']}}]\n",
    )  # fmt: skip
    guard.generate(PROMPT, policy="stream-block", max_tokens=2)  # warm: the first request builds the pipeline
    exposed_before = metric(scrape(guard_server.metrics_url), "guard_stream_exposed_chars_count", policy="stream-block")
    pieces, final = split(list(guard.stream(PROMPT, policy="stream-block", timeout=120)))
    assert final.refused and final.finish_reason == "refused" and final.text == "Filtered."
    assert (final.refusal["stage"], final.refusal["rule"]) == ("output", "the-word")
    *released, refusal = pieces  # what was released stays released; the refusal comes last
    assert refusal == "Filtered."
    released = "".join(released)
    assert greedy_long_text.startswith(released)
    assert len(released) <= re.search(re.escape(word), greedy_long_text, re.IGNORECASE).start()
    # Usage counts what vLLM generated and sent before guard saw the block: a warm tiny model often writes
    # all LONG tokens first (they arrive in one read). That the upstream request is closed at the block
    # (so vLLM aborts it) is timed against a trickling upstream in tests/server/test_faults.py.
    assert 0 < final.completion_tokens <= LONG
    assert wait_for(lambda: vllm_sum(vllm_server, "vllm:num_requests_running") == 0, timeout=5)
    exposed_after = metric(scrape(guard_server.metrics_url), "guard_stream_exposed_chars_count", policy="stream-block")
    assert exposed_after == exposed_before + 1


def test_a_filtered_stream_comes_in_pieces_that_make_the_whole_answer(guard, policy_dir, greedy_long_text):
    # Released while the upstream still generates: timed against a trickling upstream in tests/server/test_faults.py.
    add_policy(
        guard, policy_dir, "stream-pass",
        f"name: stream-pass\nsampling: {{temperature: 0.0, max_tokens: {LONG}}}\n"
        "steps:\n  - type: output_filter\n    rules: [{name: never, keywords: [zqxjzqxj]}]\n",
    )  # fmt: skip
    pieces, final = split(list(guard.stream(PROMPT, policy="stream-pass", timeout=120)))
    assert len(pieces) > 1 and "".join(pieces) == final.text == greedy_long_text
