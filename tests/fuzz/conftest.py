"""Shared pieces of the fuzz tests: one in-process guard per module (both doors, on the session's
event loop) in front of the fault-injection upstream, a few policies, and the field-path check
every rejection must pass."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, settings

from tests.support.fault_upstream import FaultUpstream
from tests.support.inprocess import start_app

# No example database: a run does not replay what earlier runs in this checkout found, so its
# outcome depends only on the code (and, like any fuzz run, on its random draws).
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# GUARD_FUZZ_SCALE=20 makes every property try 20 times as many examples (a longer hunt for bugs).
SCALE = float(os.environ.get("GUARD_FUZZ_SCALE", "1"))


def examples(count: int) -> settings:
    """FUZZ with `count` examples (times GUARD_FUZZ_SCALE); the module's sizes keep the whole set near 20 s."""
    return settings(FUZZ, max_examples=max(1, round(count * SCALE)))

# "sampling.temperature: ...", "messages[2].role: ...", "messages[0].content[1].type: ...", "policy: ...".
FIELD_PATH = re.compile(r"^(?P<path>[a-z_][a-z0-9_]*(\[\d+\])*(\.[a-z_][a-z0-9_]*(\[\d+\])*)*): \S")

# What the fault upstream answers every request with; the filtered policy's output filter refuses it.
UPSTREAM_TEXT = "late but fine"
FORBIDDEN_INPUT = "forbidden"

POLICIES = {
    "default": "name: default\n",
    "filtered": (
        "name: filtered\n"
        "steps:\n"
        "  - type: input_filter\n"
        "    rules: [{name: no-forbidden, keywords: [forbidden], regex: ['bomb\\w*']}]\n"
        "  - type: output_filter\n"
        "    stream_holdback_chars: 8\n"
        "    stream_check_every_chars: 4\n"
        "    rules: [{name: no-fine, regex: ['\\bfine\\b']}]\n"
    ),
    "system": "name: system\nsteps: [{type: system_prompt, content: Be brief.}]\n",
    "limited": "name: limited\nlimits: {max_tokens: 8, max_n: 2}\n",
}
# start_app (re)writes `default` (passthrough, the server default) and adds `fixed` (a system prompt).
POLICY_NAMES = (*POLICIES, "fixed")


@pytest.fixture(scope="module")
async def guard_app(tmp_path_factory):
    """One guard (gRPC and HTTP doors) per module; the upstream answers at once with UPSTREAM_TEXT."""
    directory = tmp_path_factory.mktemp("fuzz-policies")
    for name, text in POLICIES.items():
        (directory / f"{name}.yaml").write_text(text)
    with FaultUpstream("slow_ok", hang_seconds=0.0) as fault:
        app = await start_app(directory, fault.url, poll_seconds=60.0)
        assert sorted(loaded.policy.name for loaded in app.store.list()) == sorted(POLICY_NAMES)
        try:
            yield app
        finally:
            await app.stop(grace=1)
