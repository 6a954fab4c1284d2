"""The API key file: tenants and the hashes of their keys.

    tenants:
      - name: acme
        policies: [safe-assistant, cot]   # or ["*"]: every policy served
        default_policy: safe-assistant
        trace: false                      # may ask for the trace (scores, hidden reasoning, upstream URL)
        refusal_details: false            # refusals name the step and rule (else only the stage)
        rate_limit: {requests_per_second: 5, burst: 10, tokens_per_minute: 20000}
    keys:
      - {name: acme-ci, tenant: acme, sha256: 3f9c...}

Only hashes are stored. Keys are random 256-bit tokens (`guard keys new`), so one round of
SHA-256 is enough: unlike passwords they cannot be guessed, and a slow hash would cost every request.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from guard.policy.loader import PolicyError, PolicyIssue, load_yaml_model
from guard.policy.model import NAME_PATTERN

KEY_PREFIX = "gk_"
ALL_POLICIES = "*"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimit(_Strict):
    requests_per_second: float | None = Field(None, gt=0, description="Sustained requests per second.")
    burst: int | None = Field(None, ge=1, description="Requests allowed at once above the rate; default: one second's worth.")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Prompt plus completion tokens per minute, charged when each request ends."
    )


class TenantConfig(_Strict):
    name: str = Field(..., pattern=NAME_PATTERN, description="Tenant name: logs and the `tenant` metric label.")
    policies: list[str] = Field(..., min_length=1, description='Policies this tenant may use; ["*"]: all.')
    default_policy: str | None = Field(None, description="Policy for requests that name none; default: the first listed.")
    trace: bool = Field(False, description="May receive traces (filter scores, hidden reasoning, upstream URLs).")
    refusal_details: bool = Field(False, description="Refusals name the step and rule that refused.")
    rate_limit: RateLimit | None = None

    @model_validator(mode="after")
    def _default_is_allowed(self) -> TenantConfig:
        if self.default_policy is None and self.policies == [ALL_POLICIES]:
            raise ValueError('default_policy is required when policies is ["*"]')
        if self.default_policy is not None and ALL_POLICIES not in self.policies and self.default_policy not in self.policies:
            raise ValueError(f"default_policy {self.default_policy!r} is not in this tenant's policies")
        return self


class KeyEntry(_Strict):
    name: str = Field(..., pattern=NAME_PATTERN, description="Names the key in logs (never the key itself).")
    tenant: str
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, hex (`guard keys hash`).")


class KeyFile(_Strict):
    tenants: list[TenantConfig] = Field(..., min_length=1)
    keys: list[KeyEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> KeyFile:
        names = [tenant.name for tenant in self.tenants]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"tenant names must be unique (repeated: {', '.join(duplicates)})")
        for index, key in enumerate(self.keys):
            if key.tenant not in names:
                raise ValueError(f"keys[{index}]: unknown tenant {key.tenant!r} (tenants: {', '.join(names)})")
        hashes = [key.sha256 for key in self.keys]
        if len(set(hashes)) != len(hashes):
            raise ValueError("the same key hash is listed twice")
        return self


def load_key_file(path: Path) -> KeyFile:
    """Raises PolicyError (file:line: path: reason) for a file that cannot be used."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([PolicyIssue(str(path), None, "", f"cannot read: {exc}")]) from None
    return load_yaml_model(text, str(path), KeyFile)
