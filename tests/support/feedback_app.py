"""guard in-process with what feedback needs: an audit log, two tenants with API keys, and policies that keep
text (a best_of_n one whose candidates come from a CandidatesUpstream, one of them refused) or do not."""

from __future__ import annotations

from pathlib import Path

from guard.access import hash_key, new_key
from guard.app import GuardApp
from tests.support.candidates_upstream import CandidatesUpstream
from tests.support.inprocess import start_app

ACME_KEY = new_key()
ZETA_KEY = new_key()
# The candidates best_of_n gets, in this order, with their reward scores: the refused one would have won.
CANDIDATES = ["Paris is a lovely city.", "Paris.", "classified plans"]
SCORES = {"Paris is a lovely city.": 0.25, "Paris.": 0.75, "classified plans": 5.0}
CHOSEN = 1
REFUSED = 2


def policies(reward_url: str) -> dict[str, str]:
    return {
        "bon": f"""
name: bon
audit: {{text: full}}
steps:
  - type: output_filter
    name: outputs
    rules: [{{name: secret, keywords: ["classified"]}}]
  - type: best_of_n
    n: 3
    reward: {{type: remote, url: "{reward_url}", model: rm}}
""",
        "plain": "name: plain\naudit: {text: full}\nlimits: {max_n: 2}\n",
        "hashing": "name: hashing\naudit: {text: hashed}\n",
    }


KEY_FILE = f"""\
tenants:
  - name: acme
    policies: ["*"]
    default_policy: plain
    trace: true
  - name: zeta
    policies: ["*"]
    default_policy: plain
    trace: true
keys:
  - {{name: acme-key, tenant: acme, sha256: {hash_key(ACME_KEY)}}}
  - {{name: zeta-key, tenant: zeta, sha256: {hash_key(ZETA_KEY)}}}
"""


def candidates_upstream() -> CandidatesUpstream:
    return CandidatesUpstream(CANDIDATES, SCORES)


async def start_feedback_app(directory: Path, upstream: CandidatesUpstream, *, audit: bool = True) -> GuardApp:
    """Policies in `directory/policies`, keys in `directory/keys.yaml`, the audit log in `directory/audit.db`
    (unless off)."""
    policy_dir = directory / "policies"
    policy_dir.mkdir(exist_ok=True)
    for name, text in policies(upstream.url).items():
        (policy_dir / f"{name}.yaml").write_text(text)
    keys = directory / "keys.yaml"
    keys.write_text(KEY_FILE)
    settings: dict = {"api_keys": keys}
    if audit:
        settings["audit_db"] = directory / "audit.db"
    return await start_app(policy_dir, upstream.url, **settings)
