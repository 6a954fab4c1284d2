"""Sampling ceilings: SamplingLimits.apply, the policy check that defaults sit within them, and the runner applying them."""

from __future__ import annotations

import pytest

from guard.pipeline.base import StepDeps
from guard.pipeline.runner import Pipeline
from guard.policy.loader import LoadedPolicy, PolicyError, load_policy_text
from guard.policy.model import Policy, SamplingLimits
from guard.types import GenerateInput, Message, Sampling


def test_no_limits_change_nothing() -> None:
    sampling = Sampling(max_tokens=30000, temperature=2.0, stop=("x",))
    assert SamplingLimits().apply(sampling, ("</s>",)) is sampling


def test_max_tokens_lowers_larger_and_unset_values_and_keeps_smaller() -> None:
    limits = SamplingLimits(max_tokens=100)
    assert limits.apply(Sampling(max_tokens=500), ()).max_tokens == 100
    assert limits.apply(Sampling(max_tokens=None), ()).max_tokens == 100
    assert limits.apply(Sampling(max_tokens=100), ()).max_tokens == 100
    assert limits.apply(Sampling(max_tokens=20), ()).max_tokens == 20


def test_max_temperature_clamps_and_an_unset_temperature_becomes_min_of_1_and_the_ceiling() -> None:
    limits = SamplingLimits(max_temperature=0.7)
    assert limits.apply(Sampling(temperature=1.5), ()).temperature == 0.7
    assert limits.apply(Sampling(temperature=0.3), ()).temperature == 0.3
    assert limits.apply(Sampling(temperature=0.0), ()).temperature == 0.0
    assert limits.apply(Sampling(), ()).temperature == 0.7
    # vLLM's default of 1.0 is below a higher ceiling, so an unset temperature becomes 1.0.
    assert SamplingLimits(max_temperature=1.5).apply(Sampling(), ()).temperature == 1.0
    assert SamplingLimits(max_temperature=1.5).apply(Sampling(temperature=1.8), ()).temperature == 1.5


def test_limits_leave_other_fields_alone() -> None:
    sampling = Sampling(max_tokens=500, temperature=1.5, top_p=0.9, seed=7, stop=("x",), n=3, logprobs=2)
    limited = SamplingLimits(max_tokens=100, max_temperature=0.5).apply(sampling, ("</s>",))
    assert limited == Sampling(max_tokens=100, temperature=0.5, top_p=0.9, seed=7, stop=("x",), n=3, logprobs=2)


def test_pin_stop_keeps_the_policys_stop_strings_and_adds_the_clients() -> None:
    limits = SamplingLimits(pin_stop=True)
    assert limits.apply(Sampling(stop=("x", "y")), ("</s>", "END")).stop == ("</s>", "END", "x", "y")
    assert limits.apply(Sampling(stop=("x", "END", "x")), ("</s>", "END")).stop == ("</s>", "END", "x")
    assert limits.apply(Sampling(), ("</s>",)).stop == ("</s>",)
    # Without pin_stop a client's stop strings replace the policy's.
    assert SamplingLimits().apply(Sampling(stop=("x",)), ("</s>",)).stop == ("x",)


POLICY = """\
name: p
sampling:
  max_tokens: {default_tokens}
  temperature: {default_temperature}
  stop: {stop}
limits:
  max_tokens: 100
  max_temperature: 0.8
  pin_stop: {pin}
"""


def policy_text(default_tokens: int = 50, default_temperature: float = 0.5, stop: str = '["</s>"]', pin: str = "true") -> str:
    return POLICY.format(default_tokens=default_tokens, default_temperature=default_temperature, stop=stop, pin=pin)


def test_defaults_within_limits_load() -> None:
    policy = load_policy_text(policy_text(default_tokens=100, default_temperature=0.8), "p.yaml").policy
    assert policy.limits == SamplingLimits(max_tokens=100, max_temperature=0.8, pin_stop=True)


def test_a_max_tokens_default_above_the_ceiling_is_rejected() -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy_text(policy_text(default_tokens=101), "p.yaml")
    text = str(raised.value)
    assert text.startswith("p.yaml:") and "limits.max_tokens" in text and "sampling.max_tokens (101)" in text


def test_a_temperature_default_above_the_ceiling_is_rejected() -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy_text(policy_text(default_temperature=0.9), "p.yaml")
    assert "limits.max_temperature" in str(raised.value) and "sampling.temperature (0.9)" in str(raised.value)


def test_pin_stop_without_stop_strings_is_rejected() -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy_text(policy_text(stop="[]"), "p.yaml")
    assert "limits.pin_stop needs stop strings in sampling.stop" in str(raised.value)
    # Without pin_stop no stop strings are needed.
    assert load_policy_text(policy_text(stop="[]", pin="false"), "p.yaml")


def test_unset_defaults_are_within_any_limits() -> None:
    text = "name: p\nlimits:\n  max_tokens: 10\n  max_temperature: 0.1\n"
    assert load_policy_text(text, "p.yaml").policy.sampling.max_tokens is None


@pytest.mark.parametrize("bad", ["max_tokens: 0", "max_tokens: 40000", "max_temperature: 2.5", "max_n: 0", "max_n: 17"])
def test_limits_out_of_range_are_rejected(bad: str) -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy_text(f"name: p\nlimits:\n  {bad}\n", "p.yaml")
    assert f"limits.{bad.split(':')[0]}" in str(raised.value)


def pipeline(text: str) -> Pipeline:
    loaded = LoadedPolicy(load_policy_text(text, "p.yaml").policy, "v1", "<mem>")
    return Pipeline(loaded, StepDeps(upstream=object(), default_model="m"))  # type: ignore[arg-type]


def request(sampling: Sampling) -> GenerateInput:
    return GenerateInput(messages=[Message("user", "hi")], sampling=sampling)


def test_the_runner_applies_the_limits_to_a_requests_sampling() -> None:
    runner = pipeline(policy_text())
    ctx = runner._context(request(Sampling(max_tokens=500, temperature=1.5, top_p=0.5, stop=("x",))), None)
    assert ctx.sampling.max_tokens == 100
    assert ctx.sampling.temperature == 0.8
    assert ctx.sampling.top_p == 0.5
    assert ctx.sampling.stop == ("</s>", "x")
    assert ctx.model == "m"


def test_the_runner_fills_unset_values_from_defaults_within_the_limits() -> None:
    ctx = pipeline(policy_text())._context(request(Sampling()), None)
    assert (ctx.sampling.max_tokens, ctx.sampling.temperature, ctx.sampling.stop) == (50, 0.5, ("</s>",))
    ctx = pipeline(policy_text())._context(request(Sampling(max_tokens=70, temperature=0.1)), None)
    assert (ctx.sampling.max_tokens, ctx.sampling.temperature) == (70, 0.1)


def test_the_runner_caps_unset_values_without_defaults() -> None:
    policy = Policy.model_validate({"name": "p", "limits": {"max_tokens": 64, "max_temperature": 0.4}})
    runner = Pipeline(LoadedPolicy(policy, "v1", "<mem>"), StepDeps(upstream=object(), default_model="m"))  # type: ignore[arg-type]
    ctx = runner._context(GenerateInput(prompt="hi"), None)
    assert (ctx.sampling.max_tokens, ctx.sampling.temperature) == (64, 0.4)
    assert ctx.prompt == "hi" and ctx.messages is None
