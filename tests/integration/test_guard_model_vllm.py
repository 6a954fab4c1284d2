"""The guard_model checker against the real tiny vLLM: the protocol, not the judgement.

The tiny random-weight model answers nonsense, so these tests check that every family's request
reaches vLLM and comes back, and that the checker's verdict (or error) is exactly what the model
returned for that prompt: the same prompt sent directly through the client, greedy, must give the
same probability or the same parse failure.
"""

from __future__ import annotations

import pytest

from guard.policy.guard_model import GuardModelRule
from guard.pipeline.base import StepDeps
from guard.safety.guard_model import (
    GuardModelChecker,
    GuardModelError,
    parse_llama_guard,
    probability_from_top_logprobs,
)
from guard.types import Message, Sampling
from guard.upstream.client import UpstreamClient
from tests.support.net import free_port

pytestmark = pytest.mark.integration

CHAT = [Message("system", "You are helpful."), Message("user", "What is the capital of France?")]
ANSWER = "Paris is the capital and largest city of France."


@pytest.fixture
async def upstream(vllm_server):
    client = UpstreamClient([vllm_server.url])
    yield client
    await client.close()


async def unary(client: UpstreamClient, model: str, sampling: Sampling, *, prompt=None, messages=None):
    return await client.generate(model, prompt=prompt, messages=messages, sampling=sampling, stream=False)


def checker_for(vllm_server, upstream, **fields) -> GuardModelChecker:
    config = GuardModelRule(**{"name": "guard", "timeout_seconds": 60.0, **fields})
    return GuardModelChecker(config, upstream, vllm_server.model, top_logprobs=20)


@pytest.mark.parametrize(
    "family, category, response",
    [
        ("yes_no", "harm", None),
        ("yes_no", "violence", ANSWER),
        ("shieldgemma", "harassment", None),
        ("shieldgemma", "dangerous_content", ANSWER),
    ],
)
async def test_probability_families_read_the_first_tokens_top_logprobs(vllm_server, upstream, family, category, response):
    checker = checker_for(vllm_server, upstream, family=family, categories=[category])
    [(_, prompt)] = checker.prompts(CHAT, response)
    direct = await unary(upstream, vllm_server.model, Sampling(max_tokens=1, temperature=0.0, logprobs=20), prompt=prompt)
    [top] = direct.choices[0].top_logprobs
    # vLLM lists the 20 alternatives asked for, keyed by their text: tokens that decode to the same
    # text (byte pieces of one character: '') share one entry. Greedy: the sampled token is the top one.
    assert 2 <= len(top) <= 21 and all(lp <= 0.0 for lp in top.values())
    assert max(top.values()) == pytest.approx(direct.choices[0].token_logprobs[0])
    try:
        expected = probability_from_top_logprobs(top)
    except GuardModelError as exc:
        expected = exc
    try:
        verdict = await checker.check(CHAT, response)
    except GuardModelError as exc:
        # The tiny model's vocabulary may have no "Yes" / "No" among the likely first tokens.
        assert isinstance(expected, GuardModelError), f"checker failed ({exc}) where the model gave {expected}"
        assert exc.reason == "unparseable" and "neither ['yes'] nor ['no']" in str(exc)
    else:
        assert not isinstance(expected, GuardModelError), f"checker passed where the model gave {expected}"
        assert 0.0 <= verdict.score <= 1.0
        assert verdict.score == pytest.approx(expected, abs=1e-4)
        assert verdict.unsafe is (verdict.score >= 0.5)
        assert verdict.categories == ((category,) if verdict.unsafe else ())
        assert verdict.raw == direct.choices[0].text


@pytest.mark.parametrize("family", ["llama_guard_3", "llama_guard_4"])
async def test_llama_guard_nonsense_is_unparseable(vllm_server, upstream, family):
    checker = checker_for(vllm_server, upstream, family=family, categories=["S1", "S10"])
    [(_, prompt)] = checker.prompts(CHAT)
    direct = await unary(upstream, vllm_server.model, Sampling(max_tokens=24, temperature=0.0), prompt=prompt)
    text = direct.choices[0].text
    assert direct.completion_tokens > 0
    with pytest.raises(GuardModelError):
        parse_llama_guard(text, ["S1", "S10"])  # what a random model writes is no verdict
    with pytest.raises(GuardModelError) as raised:
        await checker.check(CHAT)
    assert raised.value.reason == "unparseable"
    assert repr(text.strip()[:50])[1:-1] in str(raised.value)


async def test_prompt_longer_than_the_guard_models_context_is_an_error(vllm_server, upstream):
    # All 14 categories make the Llama Guard prompt longer than the tiny model's 512 tokens.
    checker = checker_for(vllm_server, upstream, family="llama_guard_3")
    with pytest.raises(GuardModelError) as raised:
        await checker.check(CHAT, ANSWER)
    assert raised.value.reason == "rejected" and "HTTP 400" in str(raised.value)


async def test_tiny_timeout_is_an_error(vllm_server, upstream):
    checker = checker_for(vllm_server, upstream, family="shieldgemma", categories=["harassment"], timeout_seconds=0.001)
    with pytest.raises(GuardModelError) as raised:
        await checker.check(CHAT)
    assert raised.value.reason == "timeout"
    # The server is fine afterwards: the same check with time to spare comes back.
    checker = checker_for(vllm_server, upstream, family="shieldgemma", categories=["harassment"])
    try:
        await checker.check(CHAT)
    except GuardModelError as exc:
        assert exc.reason == "unparseable"


async def test_wrong_url_is_an_error(vllm_server, upstream):
    url = f"http://127.0.0.1:{free_port()}"
    dead = StepDeps(upstream=upstream).upstream_at(url)
    checker = checker_for(vllm_server, dead, family="yes_no", url=url, model=vllm_server.model)
    try:
        with pytest.raises(GuardModelError) as raised:
            await checker.check(CHAT)
        assert raised.value.reason == "unavailable"
    finally:
        await dead.close()


async def test_separate_url_reaches_that_server_and_finds_its_model(vllm_server, upstream):
    deps = StepDeps(upstream=UpstreamClient([f"http://127.0.0.1:{free_port()}"]))
    checker = checker_for(
        vllm_server, deps.upstream_at(vllm_server.url), family="llama_guard_3", categories=["S1"], url=vllm_server.url
    )
    try:
        with pytest.raises(GuardModelError) as raised:
            await checker.check(CHAT)
        # Not "unavailable": the rule's own server (whose only model was found by asking it) answered.
        assert raised.value.reason == "unparseable"
    finally:
        await deps.upstream.close()
        await deps.other_upstreams[vllm_server.url].close()


async def test_chat_api_top_logprobs_come_back_per_position(vllm_server, upstream):
    completion = await unary(
        upstream, vllm_server.model, Sampling(max_tokens=3, temperature=0.0, logprobs=5), messages=CHAT[1:]
    )
    choice = completion.choices[0]
    assert choice.top_logprobs is not None and len(choice.top_logprobs) == len(choice.token_logprobs) == 3
    assert all(len(alternatives) == 5 for alternatives in choice.top_logprobs)
    # Greedy: the sampled token is the most likely alternative at every position.
    assert [max(alternatives.values()) for alternatives in choice.top_logprobs] == pytest.approx(list(choice.token_logprobs))
