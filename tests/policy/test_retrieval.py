"""retrieve and grounding_check in a policy file: what validates, and where each mistake is reported."""

from __future__ import annotations

import pytest

from guard.policy.loader import PolicyError, load_policy_text
from guard.policy.retrieval import DEFAULT_SOURCE_TEMPLATE, DEFAULT_TEMPLATE


def issues(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(PolicyError) as raised:
        load_policy_text(text, "p.yaml")
    return [(issue.line, issue.path, issue.reason) for issue in raised.value.issues]


def test_a_retrieval_policy_validates_with_its_defaults():
    loaded = load_policy_text("name: p\nsteps:\n  - {type: retrieve, index: docs.index}\n  - {type: grounding_check}\n", "p.yaml")
    retrieve, grounding = loaded.policy.steps
    assert (retrieve.top_k, retrieve.min_score, retrieve.template, retrieve.source_template) == (
        4, 0.3, DEFAULT_TEMPLATE, DEFAULT_SOURCE_TEMPLATE
    )
    assert (grounding.method, grounding.threshold, grounding.min_supported, grounding.on_unsupported) == ("embedding", 0.6, 1.0, "flag")


@pytest.mark.parametrize(
    ("step", "path", "reason"),
    [
        ("{type: retrieve, index: i, template: 'Use these.'}", "steps[0].template", "must contain '{sources}'"),
        ("{type: retrieve, index: i, template: '{sources} {oops}'}", "steps[0].template", "cannot fill the template"),
        ("{type: retrieve, index: i, source_template: '[{n}] {title}: {text}'}", "steps[0].source_template", "may use {n}, {id}"),
        ("{type: retrieve, index: i, source_template: '[{n}]'}", "steps[0].source_template", "must contain '{text}'"),
        ("{type: retrieve, index: i, top_k: 0}", "steps[0].top_k", "greater than or equal to 1"),
        ("{type: retrieve}", "steps[0].index", "missing required key 'index'"),
        ("{type: grounding_check, method: nli}", "steps[0].method", "Input should be 'embedding'"),
        ("{type: grounding_check, on_unsupported: warn}", "steps[0].on_unsupported", "'flag' or 'refuse'"),
    ],
)
def test_a_bad_step_is_reported_at_its_field(step, path, reason):
    [(line, where, why)] = issues(f"name: p\nsteps:\n  - {step}\n")
    assert line == 3 and where == path and reason in why


def test_grounding_needs_a_retrieve_step_before_it_and_one_retrieve_is_enough():
    [(_, _, why)] = issues("name: p\nsteps:\n  - {type: grounding_check}\n  - {type: retrieve, index: i}\n")
    assert "steps[0]: grounding_check checks answers against retrieved chunks" in why
    [(_, _, why)] = issues("name: p\nsteps:\n  - {type: retrieve, index: i}\n  - {type: retrieve, name: again, index: j}\n")
    assert "at most one retrieve step" in why
