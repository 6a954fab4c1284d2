"""AccessControl: open mode, API keys, policy choice, traces, hot reload and per-tenant rate limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guard.access.control import ANONYMOUS, AccessControl, Tenant
from guard.access.keys import hash_key, new_key
from guard.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from guard.policy.loader import PolicyError

ACME_KEY = new_key()
OPS_KEY = new_key()
NEW_KEY = new_key()


def key_file(*, acme_rate: str = "", extra_keys: str = "", acme_policies: str = "[safe, cot]") -> str:
    rate = f"\n    rate_limit: {acme_rate}" if acme_rate else ""
    return f"""\
tenants:
  - name: acme
    policies: {acme_policies}
    trace: false{rate}
  - name: ops
    policies: ["*"]
    default_policy: cot
    trace: true
    refusal_details: true
keys:
  - {{name: acme-ci, tenant: acme, sha256: {hash_key(ACME_KEY)}}}
  - {{name: ops-admin, tenant: ops, sha256: {hash_key(OPS_KEY)}}}
{extra_keys}"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class KeyWriter:
    """Writes the key file so that each version has a new mtime, whatever the file system's resolution."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.version = 0

    def __call__(self, text: str) -> Path:
        self.path.write_text(text)
        self.version += 1
        stamp = 1_700_000_000_000_000_000 + self.version * 1_000_000_000
        os.utime(self.path, ns=(stamp, stamp))
        return self.path


@pytest.fixture
def write(tmp_path: Path) -> KeyWriter:
    return KeyWriter(tmp_path / "keys.yaml")


def keyed(write: KeyWriter, text: str | None = None, clock: Clock | None = None) -> AccessControl:
    return AccessControl(write(text or key_file()), clock=clock or Clock())


def bearer(key: str) -> str:
    return f"Bearer {key}"


# Open mode


@pytest.mark.parametrize("header", [None, "", "Bearer whatever", "Basic abc"])
def test_open_mode_makes_every_caller_the_anonymous_tenant(header: str | None) -> None:
    access = AccessControl()
    tenant = access.authenticate(header)
    assert access.open and tenant.name == ANONYMOUS == "anonymous"
    assert tenant.policies is None and tenant.default_policy is None
    assert tenant.trace and tenant.refusal_details and tenant.rate_limit is None
    assert access.tenant_names() == ["anonymous"]
    assert access.policy_for(tenant, "", "server-default") == "server-default"
    assert access.policy_for(tenant, "cot", "server-default") == "cot"
    access.check_trace(tenant)


def test_allow_policies_restricts_the_anonymous_tenant() -> None:
    access = AccessControl(allow_policies=["safe", "cot"])
    tenant = access.authenticate(None)
    assert tenant.policies == {"safe", "cot"} and tenant.default_policy is None
    assert access.policy_for(tenant, "cot", "safe") == "cot"
    assert access.policy_for(tenant, "", "safe") == "safe"
    with pytest.raises(PermissionDenied) as raised:
        access.policy_for(tenant, "raw", "safe")
    assert str(raised.value).startswith("policy:") and "'raw'" in str(raised.value)
    # The server's default is checked too.
    with pytest.raises(PermissionDenied, match="^policy:"):
        access.policy_for(tenant, "", "raw")


def test_a_single_allowed_policy_becomes_the_default() -> None:
    access = AccessControl(allow_policies=["safe"])
    tenant = access.authenticate(None)
    assert tenant.default_policy == "safe"
    assert access.policy_for(tenant, "", "raw") == "safe"
    with pytest.raises(PermissionDenied, match="^policy:"):
        access.policy_for(tenant, "raw", "raw")


def test_open_mode_has_no_rate_limit() -> None:
    access = AccessControl()
    tenant = access.authenticate(None)
    for _ in range(1000):
        access.admit(tenant)
    access.charge_tokens(tenant, 10**9)
    access.admit(tenant)


# API keys


@pytest.mark.parametrize("header", [None, "", "   "])
def test_a_missing_key_is_unauthenticated(write: KeyWriter, header: str | None) -> None:
    with pytest.raises(Unauthenticated) as raised:
        keyed(write).authenticate(header)
    assert str(raised.value).startswith("authorization:")


@pytest.mark.parametrize("header", [f"Basic {ACME_KEY}", f"Token {ACME_KEY}", ACME_KEY, "Bearer", "Bearer   "])
def test_a_header_that_is_not_bearer_key_is_unauthenticated(write: KeyWriter, header: str) -> None:
    with pytest.raises(Unauthenticated) as raised:
        keyed(write).authenticate(header)
    assert str(raised.value).startswith("authorization:")


def test_an_unknown_key_is_unauthenticated(write: KeyWriter) -> None:
    access = keyed(write)
    for header in (bearer(NEW_KEY), bearer(hash_key(ACME_KEY)), bearer(ACME_KEY + "x")):
        with pytest.raises(Unauthenticated) as raised:
            access.authenticate(header)
        assert str(raised.value).startswith("authorization:") and "unknown API key" in str(raised.value)


def test_a_right_key_gives_its_tenant(write: KeyWriter) -> None:
    access = keyed(write)
    assert not access.open and access.tenant_names() == ["acme", "ops"]
    acme = access.authenticate(bearer(ACME_KEY))
    assert acme.name == "acme" and acme.policies == {"safe", "cot"} and not acme.trace and not acme.refusal_details
    ops = access.authenticate(bearer(OPS_KEY))
    assert ops.name == "ops" and ops.policies is None and ops.trace and ops.refusal_details
    # The scheme is case-insensitive and surrounding blanks are ignored.
    assert access.authenticate(f"  bearer {ACME_KEY}  ").name == "acme"
    assert access.authenticate(f"BEARER  {OPS_KEY}").name == "ops"


def test_policy_resolution_requested_then_tenant_default_then_server_default(write: KeyWriter) -> None:
    access = keyed(write)
    acme = access.authenticate(bearer(ACME_KEY))
    ops = access.authenticate(bearer(OPS_KEY))
    assert access.policy_for(acme, "cot", "server") == "cot"
    assert access.policy_for(acme, "", "server") == "safe"  # no default_policy: the first listed
    assert access.policy_for(ops, "", "server") == "cot"
    assert access.policy_for(ops, "anything", "server") == "anything"  # "*": every policy
    # A tenant without a default of its own (the anonymous one) falls back to the server's.
    none = Tenant("t", policies=None, default_policy=None, trace=False, refusal_details=False)
    assert access.policy_for(none, "", "server") == "server"


def test_a_policy_outside_the_tenants_list_is_denied(write: KeyWriter) -> None:
    access = keyed(write)
    acme = access.authenticate(bearer(ACME_KEY))
    with pytest.raises(PermissionDenied) as raised:
        access.policy_for(acme, "raw", "safe")
    assert str(raised.value).startswith("policy:") and "'acme'" in str(raised.value) and "'raw'" in str(raised.value)


def test_traces_only_for_tenants_allowed_them(write: KeyWriter) -> None:
    access = keyed(write)
    access.check_trace(access.authenticate(bearer(OPS_KEY)))
    with pytest.raises(PermissionDenied) as raised:
        access.check_trace(access.authenticate(bearer(ACME_KEY)))
    assert str(raised.value).startswith("include_trace:")


def test_metric_label(write: KeyWriter) -> None:
    access = keyed(write)
    assert access.metric_label(None) == "other"
    assert access.metric_label(access.authenticate(bearer(ACME_KEY))) == "acme"
    assert AccessControl().metric_label(AccessControl().authenticate(None)) == "anonymous"


# Hot reload


def test_an_unchanged_file_is_not_reloaded(write: KeyWriter) -> None:
    access = keyed(write)
    assert access.reload_now() is False


def test_an_edited_file_adds_a_key(write: KeyWriter) -> None:
    access = keyed(write)
    with pytest.raises(Unauthenticated):
        access.authenticate(bearer(NEW_KEY))
    write(key_file(extra_keys=f"  - {{name: acme-new, tenant: acme, sha256: {hash_key(NEW_KEY)}}}\n"))
    assert access.reload_now() is True
    assert access.authenticate(bearer(NEW_KEY)).name == "acme"
    assert access.authenticate(bearer(ACME_KEY)).name == "acme"
    assert access.last_error is None


def test_an_edited_file_removes_a_key(write: KeyWriter) -> None:
    access = keyed(write)
    text = key_file().replace(f"  - {{name: ops-admin, tenant: ops, sha256: {hash_key(OPS_KEY)}}}\n", "")
    assert OPS_KEY not in text and hash_key(OPS_KEY) not in text
    write(text)
    assert access.reload_now() is True
    with pytest.raises(Unauthenticated):
        access.authenticate(bearer(OPS_KEY))


def test_a_broken_file_keeps_the_last_good_keys(write: KeyWriter) -> None:
    access = keyed(write)
    write(key_file(extra_keys=f"  - {{name: bad, tenant: nobody, sha256: {hash_key(NEW_KEY)}}}\n"))
    assert access.reload_now() is False
    assert isinstance(access.last_error, PolicyError) and "unknown tenant 'nobody'" in str(access.last_error)
    assert access.authenticate(bearer(ACME_KEY)).name == "acme"
    with pytest.raises(Unauthenticated):
        access.authenticate(bearer(NEW_KEY))
    # Fixed again: the new version takes effect and the error clears.
    write(key_file(extra_keys=f"  - {{name: good, tenant: ops, sha256: {hash_key(NEW_KEY)}}}\n"))
    assert access.reload_now() is True
    assert access.last_error is None and access.authenticate(bearer(NEW_KEY)).name == "ops"


def test_a_deleted_file_keeps_the_last_good_keys(write: KeyWriter) -> None:
    access = keyed(write)
    write.path.unlink()
    assert access.reload_now() is False
    assert access.last_error is not None and "cannot read" in str(access.last_error)
    assert access.authenticate(bearer(ACME_KEY)).name == "acme"


def test_a_broken_file_at_startup_raises(write: KeyWriter) -> None:
    with pytest.raises(PolicyError, match=r"keys\.yaml:3: tenants\[0\]\.polices: unknown key"):
        AccessControl(write("tenants:\n  - name: acme\n    polices: [safe]\n"))
    with pytest.raises(PolicyError, match="cannot read"):
        AccessControl(write.path.parent / "absent.yaml")


# Rate limits


def test_requests_per_second_with_burst(write: KeyWriter) -> None:
    clock = Clock()
    access = keyed(write, key_file(acme_rate="{requests_per_second: 2, burst: 2}"), clock)
    acme = access.authenticate(bearer(ACME_KEY))
    access.admit(acme)
    access.admit(acme)
    with pytest.raises(ResourceExhausted) as raised:
        access.admit(acme)
    assert raised.value.retry_after == pytest.approx(0.5)
    assert str(raised.value).startswith("rate limit:") and "'acme'" in str(raised.value)
    clock.now += 0.25
    with pytest.raises(ResourceExhausted) as raised:
        access.admit(acme)
    assert raised.value.retry_after == pytest.approx(0.25)
    clock.now += 0.25
    access.admit(acme)
    with pytest.raises(ResourceExhausted):
        access.admit(acme)


def test_rate_limits_are_per_tenant(write: KeyWriter) -> None:
    clock = Clock()
    access = keyed(write, key_file(acme_rate="{requests_per_second: 1, burst: 1}"), clock)
    acme, ops = access.authenticate(bearer(ACME_KEY)), access.authenticate(bearer(OPS_KEY))
    access.admit(acme)
    with pytest.raises(ResourceExhausted):
        access.admit(acme)
    for _ in range(100):
        access.admit(ops)  # ops has no rate_limit


def test_tokens_per_minute_debt_is_repaid_over_time(write: KeyWriter) -> None:
    clock = Clock()
    access = keyed(write, key_file(acme_rate="{tokens_per_minute: 60}"), clock)
    acme = access.authenticate(bearer(ACME_KEY))
    access.admit(acme)
    access.charge_tokens(acme, 120)
    # The bucket held 60 (a minute's worth) and refills 1 token/s: 120 leaves it at -60, and a
    # request needs 1 token, so 61 s.
    with pytest.raises(ResourceExhausted) as raised:
        access.admit(acme)
    assert raised.value.retry_after == pytest.approx(61.0)
    assert "60 tokens per minute" in str(raised.value)
    clock.now += 60.5
    with pytest.raises(ResourceExhausted) as raised:
        access.admit(acme)
    assert raised.value.retry_after == pytest.approx(0.5)
    clock.now += 0.5
    access.admit(acme)


def test_charging_nothing_costs_nothing(write: KeyWriter) -> None:
    clock = Clock()
    access = keyed(write, key_file(acme_rate="{tokens_per_minute: 60}"), clock)
    acme = access.authenticate(bearer(ACME_KEY))
    access.charge_tokens(acme, 59)
    access.charge_tokens(acme, 0)
    access.charge_tokens(acme, -100)
    access.admit(acme)
    access.charge_tokens(acme, 1)
    with pytest.raises(ResourceExhausted):
        access.admit(acme)


def test_editing_a_tenants_rate_limit_resets_its_limiter(write: KeyWriter) -> None:
    clock = Clock()
    access = keyed(write, key_file(acme_rate="{requests_per_second: 1, burst: 1}"), clock)
    acme = access.authenticate(bearer(ACME_KEY))
    access.admit(acme)
    with pytest.raises(ResourceExhausted):
        access.admit(acme)
    write(key_file(acme_rate="{requests_per_second: 1, burst: 3}"))
    assert access.reload_now()
    acme = access.authenticate(bearer(ACME_KEY))
    for _ in range(3):
        access.admit(acme)
    with pytest.raises(ResourceExhausted):
        access.admit(acme)


def test_a_reload_that_keeps_a_tenants_rate_limit_keeps_its_state(write: KeyWriter) -> None:
    clock = Clock()
    rate = "{requests_per_second: 1, burst: 1}"
    access = keyed(write, key_file(acme_rate=rate), clock)
    access.admit(access.authenticate(bearer(ACME_KEY)))
    write(key_file(acme_rate=rate, extra_keys=f"  - {{name: acme-new, tenant: acme, sha256: {hash_key(NEW_KEY)}}}\n"))
    assert access.reload_now()
    with pytest.raises(ResourceExhausted):
        access.admit(access.authenticate(bearer(NEW_KEY)))  # the same tenant, so the same bucket


def test_removing_a_tenants_rate_limit_lifts_it(write: KeyWriter) -> None:
    clock = Clock()
    access = keyed(write, key_file(acme_rate="{requests_per_second: 1, burst: 1}"), clock)
    access.admit(access.authenticate(bearer(ACME_KEY)))
    write(key_file())
    assert access.reload_now()
    acme = access.authenticate(bearer(ACME_KEY))
    assert acme.rate_limit is None
    for _ in range(10):
        access.admit(acme)
