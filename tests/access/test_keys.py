"""The API key file: key generation, hashing, and errors that name the file, line, path and reason."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from guard.access.keys import KeyFile, hash_key, load_key_file, new_key
from guard.policy.loader import PolicyError, PolicyIssue

H1 = hash_key("gk_first")
H2 = hash_key("gk_second")

GOOD = f"""\
tenants:
  - name: acme
    policies: [safe, cot]
    default_policy: cot
    trace: true
    rate_limit: {{requests_per_second: 5, burst: 10, tokens_per_minute: 20000}}
  - name: ops
    policies: ["*"]
    default_policy: safe
keys:
  - {{name: acme-ci, tenant: acme, sha256: {H1}}}
  - {{name: ops-admin, tenant: ops, sha256: {H2}}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return path


def issues(tmp_path: Path, text: str) -> list[PolicyIssue]:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as raised:
        load_key_file(path)
    assert all(issue.file == str(path) for issue in raised.value.issues)
    return raised.value.issues


def only_issue(tmp_path: Path, text: str) -> PolicyIssue:
    [issue] = issues(tmp_path, text)
    return issue


def test_new_keys_are_prefixed_random_tokens() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith("gk_")
        assert len(key) >= 3 + 43  # 32 random bytes, urlsafe base64
        assert re.fullmatch(r"gk_[A-Za-z0-9_-]+", key)


def test_hash_key_is_hex_sha256_of_the_key() -> None:
    assert hash_key("gk_abc") == hashlib.sha256(b"gk_abc").hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_key(new_key()))
    assert hash_key("gk_abc") != hash_key("gk_abd")


def test_a_valid_file_loads(tmp_path: Path) -> None:
    config = load_key_file(write(tmp_path, GOOD))
    assert isinstance(config, KeyFile)
    acme, ops = config.tenants
    assert (acme.name, acme.policies, acme.default_policy, acme.trace) == ("acme", ["safe", "cot"], "cot", True)
    assert acme.rate_limit is not None and acme.rate_limit.burst == 10 and acme.rate_limit.tokens_per_minute == 20000
    assert (ops.policies, ops.default_policy, ops.trace, ops.rate_limit) == (["*"], "safe", False, None)
    assert [(key.name, key.tenant, key.sha256) for key in config.keys] == [("acme-ci", "acme", H1), ("ops-admin", "ops", H2)]


def test_a_file_without_keys_is_valid(tmp_path: Path) -> None:
    config = load_key_file(write(tmp_path, "tenants:\n  - {name: acme, policies: [safe]}\n"))
    assert config.keys == [] and config.tenants[0].default_policy is None


def test_a_misspelt_key_is_named_at_its_line_with_a_hint(tmp_path: Path) -> None:
    text = "tenants:\n  - name: acme\n    polices: [safe]\n"
    found = issues(tmp_path, text)
    unknown = next(issue for issue in found if issue.path == "tenants[0].polices")
    assert unknown.line == 3
    assert "unknown key 'polices'" in unknown.reason and "did you mean 'policies'?" in unknown.reason
    # `policies` itself is then missing, reported at the tenant's line.
    missing = next(issue for issue in found if issue.path == "tenants[0].policies")
    assert missing.line == 2 and "missing required key 'policies'" in missing.reason
    path = str(tmp_path / "keys.yaml")
    with pytest.raises(PolicyError, match=re.escape(f"{path}:3: tenants[0].polices: unknown key 'polices'")):
        load_key_file(tmp_path / "keys.yaml")


def test_an_unknown_top_level_key_is_rejected(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, "tenants:\n  - {name: acme, policies: [safe]}\nkey:\n  - {}\n")
    assert (issue.line, issue.path) == (3, "key") and "did you mean 'keys'?" in issue.reason


def test_a_key_naming_an_unknown_tenant_is_rejected(tmp_path: Path) -> None:
    text = f"""\
tenants:
  - {{name: acme, policies: [safe]}}
keys:
  - {{name: k1, tenant: acme, sha256: {H1}}}
  - {{name: k2, tenant: acne, sha256: {H2}}}
"""
    issue = only_issue(tmp_path, text)
    assert "keys[1]" in str(issue) and "unknown tenant 'acne'" in issue.reason and "tenants: acme" in issue.reason


@pytest.mark.parametrize(
    "digest",
    ["abc123", H1[:-1], H1 + "0", H1.upper(), "z" * 64],
    ids=["short", "63-hex", "65-hex", "uppercase", "not-hex"],
)
def test_a_bad_sha256_is_named_at_its_line(tmp_path: Path, digest: str) -> None:
    text = f"""\
tenants:
  - {{name: acme, policies: [safe]}}
keys:
  - name: k1
    tenant: acme
    sha256: "{digest}"
"""
    issue = only_issue(tmp_path, text)
    assert (issue.line, issue.path) == (6, "keys[0].sha256")
    assert digest in issue.reason
    assert str(issue).startswith(f"{tmp_path / 'keys.yaml'}:6: keys[0].sha256: ")


def test_duplicate_tenant_names_are_rejected(tmp_path: Path) -> None:
    text = "tenants:\n  - {name: acme, policies: [a]}\n  - {name: ops, policies: [a]}\n  - {name: acme, policies: [b]}\n"
    issue = only_issue(tmp_path, text)
    assert "tenant names must be unique" in issue.reason and "repeated: acme" in issue.reason
    assert "ops" not in issue.reason


def test_a_key_hash_listed_twice_is_rejected(tmp_path: Path) -> None:
    text = f"""\
tenants:
  - {{name: acme, policies: [safe]}}
  - {{name: ops, policies: [safe]}}
keys:
  - {{name: k1, tenant: acme, sha256: {H1}}}
  - {{name: k2, tenant: ops, sha256: {H1}}}
"""
    assert "the same key hash is listed twice" in only_issue(tmp_path, text).reason


def test_a_default_policy_outside_the_tenants_policies_is_rejected(tmp_path: Path) -> None:
    text = "tenants:\n  - name: ops\n    policies: [a]\n  - name: acme\n    policies: [safe, cot]\n    default_policy: other\n"
    issue = only_issue(tmp_path, text)
    assert (issue.line, issue.path) == (4, "tenants[1]")
    assert "default_policy 'other' is not in this tenant's policies" in issue.reason


def test_all_policies_need_a_default_policy(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, 'tenants:\n  - name: acme\n    policies: ["*"]\n')
    assert (issue.line, issue.path) == (2, "tenants[0]")
    assert 'default_policy is required when policies is ["*"]' in issue.reason
    # With one, any default is fine: "*" allows every policy.
    assert load_key_file(write(tmp_path, 'tenants:\n  - {name: acme, policies: ["*"], default_policy: x}\n'))


def test_an_invalid_tenant_name_and_empty_policies_are_rejected(tmp_path: Path) -> None:
    found = issues(tmp_path, "tenants:\n  - name: Acme Corp\n    policies: []\n")
    assert {issue.path for issue in found} == {"tenants[0].name", "tenants[0].policies"}


def test_a_missing_file_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(PolicyError) as raised:
        load_key_file(path)
    [issue] = raised.value.issues
    assert issue.line is None and issue.file == str(path)
    assert str(raised.value).startswith(f"{path}: cannot read: ")


def test_a_directory_or_non_utf8_file_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_key_file(tmp_path)
    binary = tmp_path / "keys.yaml"
    binary.write_bytes(b"tenants: \xff\xfe\n")
    with pytest.raises(PolicyError, match="cannot read"):
        load_key_file(binary)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_file_is_rejected(tmp_path: Path, text: str) -> None:
    issue = only_issue(tmp_path, text)
    assert issue.line == 1 and "empty file" in issue.reason


def test_a_file_without_tenants_is_rejected(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, f"keys:\n  - {{name: k1, tenant: acme, sha256: {H1}}}\n")
    assert issue.path == "tenants" and "missing required key 'tenants'" in issue.reason


def test_invalid_yaml_names_its_line(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, "tenants:\n  - name: acme\n    policies: [a\n")
    assert issue.line is not None and issue.line >= 3 and "invalid YAML" in issue.reason
