"""The alignment loop end to end over the real tiny vLLM: simulated users who (silently) prefer shorter
answers give feedback through the real gRPC door; guard exports preference pairs from its audit log,
trains a reward head on them, reloads the policy with it, and best_of_n then picks what those users
prefer measurably more often on prompts they never gave feedback on."""

from __future__ import annotations

import pytest

from benchmarks.alignment_loop import PREFERENCES, prompts, run_loop
from guard.client import GuardClient
from tests.support.guard_process import GuardProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def audited_guard(vllm_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("loop")
    policies = workdir / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text("name: default\n")
    audit_db = workdir / "audit.db"
    process = GuardProcess(
        policies, [vllm_server.url], log_path=workdir / "guard.log", extra=["--audit-db", str(audit_db)]
    )
    try:
        process.wait_serving()
        yield process, policies, audit_db, workdir
    finally:
        process.terminate()


def test_feedback_trains_a_reward_that_picks_what_users_prefer(audited_guard):
    process, policies, audit_db, workdir = audited_guard
    with GuardClient(process.target) as client:
        result = run_loop(
            client, policies, audit_db, workdir, PREFERENCES["shorter"], n=4, max_tokens=16,
            train_prompts=prompts(45), eval_prompts=prompts(30, offset=45), timeout=120,
        )
    assert result["feedback_sent"] >= 30 and result["pairs"] >= 60
    assert result["heldout_pairwise_accuracy"] >= 0.65
    before, after = result["before"]["win_rate"], result["after"]["win_rate"]
    assert result["after"]["prompts_counted"] >= 20
    # The embedding reward knows nothing of length (about chance, 1 in 4); the trained one learned it.
    assert after >= before + 0.2, result
