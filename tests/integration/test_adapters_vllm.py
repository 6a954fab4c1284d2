"""LoRA adapters per policy on the real vLLM: `guard serve` without --upstream starts its managed vLLM on the tiny
Llama with the adapter the policy directory declares, and requests under the adapter's policy reach it.

A vLLM of its own (the session's runs without LoRA: on CPU, LoRA turns torch.compile off), started the way
operators start it, by guard. It starts faster than the session's (no compile warm-up) and stops with the module.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request

import pytest

from guard.client import GuardClient
from tests.support.guard_process import GuardProcess
from tests.support.net import free_port
from tests.support.tiny_models import build_tiny_lora

pytestmark = pytest.mark.integration

BASE = "tiny-llama"
GREEDY = "sampling: {temperature: 0.0, max_tokens: 12, seed: 7}"
MESSAGES = [("user", "Write a short poem about the sea.")]


def policy(name: str, adapter: str = "") -> str:
    return f"name: {name}\n{GREEDY}\n" + (f"adapter: {adapter}\n" if adapter else "")


@pytest.fixture(scope="module")
def served(tiny_llama_dir, tmp_path_factory):
    """(guard process, managed vLLM URL, policy directory)."""
    policies = tmp_path_factory.mktemp("adapter-policies")
    shutil.copytree(build_tiny_lora(seed=0), policies / "adapters" / "tiny-tuned")
    (policies / "default.yaml").write_text("name: default\n")
    (policies / "base.yaml").write_text(policy("base"))
    (policies / "tuned.yaml").write_text(policy("tuned", "{name: tiny-tuned, path: adapters/tiny-tuned}"))
    vllm_port = free_port()
    work = tmp_path_factory.mktemp("adapter-guard")
    process = GuardProcess(
        policies, [], model=BASE, log_path=work / "guard.log",
        extra=["--vllm-model-dir", str(tiny_llama_dir), "--vllm-max-model-len", "512"],
        env={"GUARD_VLLM_PORT": str(vllm_port), "GUARD_CACHE_DIR": str(work)},  # the managed vLLM's log: work/vllm.log
    )  # fmt: skip
    try:
        process.wait_serving(timeout=300)
        yield process, f"http://127.0.0.1:{vllm_port}", policies
    finally:
        process.terminate()


def vllm_models(url: str) -> dict[str, dict]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
        return {model["id"]: model for model in json.load(response)["data"]}


def vllm_chat(url: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": r, "content": c} for r, c in MESSAGES], "temperature": 0.0, "max_tokens": 12, "seed": 7}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def ask(process: GuardProcess, policy_name: str) -> str:
    with GuardClient(process.target) as guard:
        return guard.generate(MESSAGES, policy=policy_name, timeout=60).text


def wait_for(condition, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_the_managed_vllm_serves_the_declared_adapter_on_its_base_model(served):
    _, vllm, policies = served
    adapter = vllm_models(vllm)["tiny-tuned"]
    assert adapter["parent"] == BASE and adapter["root"] == str((policies / "adapters" / "tiny-tuned").resolve())


def test_requests_under_the_adapter_policy_reach_the_adapter(served):
    process, vllm, _ = served
    tuned, base = ask(process, "tuned"), ask(process, "base")
    # Same prompt, greedy, same seed: the adapter's weights make the difference, and guard asked vLLM for it.
    assert tuned != base
    assert tuned == vllm_chat(vllm, "tiny-tuned") and base == vllm_chat(vllm, BASE)
    with GuardClient(process.target) as guard:
        assert {p.name: p.model for p in guard.list_policies()}["tuned"] == "tiny-tuned"


def test_a_policy_declaring_a_new_adapter_serves_it_without_a_restart(served):
    process, vllm, policies = served
    shutil.copytree(build_tiny_lora(seed=1), policies / "adapters" / "tiny-tuned-2")
    (policies / "tuned-2.yaml").write_text(policy("tuned-2", "{name: tiny-tuned-2, path: adapters/tiny-tuned-2}"))
    with GuardClient(process.target) as guard:
        assert wait_for(lambda: "tuned-2" in {p.name for p in guard.list_policies()}), guard.policy_load_errors()
    assert vllm_models(vllm)["tiny-tuned-2"]["parent"] == BASE  # loaded through vLLM's runtime adapter loading
    assert ask(process, "tuned-2") not in {ask(process, "tuned"), ask(process, "base")}


def test_an_unknown_adapter_is_a_policy_error_and_the_last_good_version_serves(served):
    process, _, policies = served
    with GuardClient(process.target) as guard:
        version = {p.name: p.version for p in guard.list_policies()}["tuned"]
        before = ask(process, "tuned")
        (policies / "tuned.yaml").write_text(policy("tuned", "tiny-ghost"))
        errors = wait_for(lambda: guard.policy_load_errors().get(str(policies / "tuned.yaml")))
        assert errors and errors[0].startswith(f"{policies / 'tuned.yaml'}:3: adapter: upstream ")
        assert "does not serve adapter 'tiny-ghost' (it serves: tiny-llama, tiny-tuned" in errors[0]
        assert {p.name: p.version for p in guard.list_policies()}["tuned"] == version
        assert ask(process, "tuned") == before
