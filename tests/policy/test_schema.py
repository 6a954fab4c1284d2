"""The shipped JSON Schema is the one the model generates (so it cannot go stale)."""

from __future__ import annotations

import json
from pathlib import Path

from guard.policy.schema import JSON_SCHEMA_DIALECT, policy_json_schema, policy_schema_text

SHIPPED = Path(__file__).resolve().parents[2] / "policies" / "policy.schema.json"


def test_the_shipped_schema_is_up_to_date() -> None:
    assert SHIPPED.read_text() == policy_schema_text(), (
        "policies/policy.schema.json is stale: run `guard policy schema -o policies/policy.schema.json`"
    )


def test_the_schema_describes_the_policy_format() -> None:
    schema = policy_json_schema()
    assert schema["$schema"] == JSON_SCHEMA_DIALECT and schema["title"] == "guard policy"
    assert schema["required"] == ["name"] and schema["additionalProperties"] is False
    step_types = {ref.rsplit("/", 1)[1] for ref in schema["properties"]["steps"]["items"]["discriminator"]["mapping"].values()}
    assert step_types == {
        "SystemPromptStep", "ChainOfThoughtStep", "InputFilterStep", "OutputFilterStep", "BestOfNStep", "RetrieveStep",
        "GroundingCheckStep",
    }
    assert json.loads(policy_schema_text()) == schema
