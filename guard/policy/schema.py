"""JSON Schema of the policy format, for editors (yaml-language-server) and CI.

The shipped copy, policies/policy.schema.json, is regenerated with
`guard policy schema -o policies/policy.schema.json`; a test fails when it is stale.
"""

from __future__ import annotations

import json
from typing import Any

from guard.policy.model import Policy

# pydantic emits 2020-12 ($defs, prefixItems); yaml-language-server understands it.
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def policy_json_schema() -> dict[str, Any]:
    schema = Policy.model_json_schema()
    schema["title"] = "guard policy"
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def policy_schema_text() -> str:
    """The schema as written to disk: stable key order, so regenerating gives a clean diff."""
    return json.dumps(policy_json_schema(), indent=2) + "\n"
