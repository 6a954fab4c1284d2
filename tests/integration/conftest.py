"""A real guard subprocess in front of the session's real vLLM server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from guard.client import GuardClient
from tests.support.guard_process import GuardProcess

REPO = Path(__file__).resolve().parents[2]

# Test-only policies, next to copies of the shipped ones.
TEST_POLICIES = {
    "echo-system.yaml": """
name: echo-system
steps:
  - type: system_prompt
    content: You are a careful assistant who always answers in French.
""",
    "greedy.yaml": """
name: greedy
sampling: {temperature: 0.0, max_tokens: 12}
""",
    "capped.yaml": """
name: capped
sampling: {temperature: 0.0}
limits: {max_tokens: 3, max_temperature: 0.0}
""",
    "choices.yaml": """
name: choices
sampling: {max_tokens: 6}
limits: {max_n: 3}
""",
}


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("policies")
    for path in (REPO / "policies").glob("*.yaml"):
        shutil.copy(path, directory / path.name)
    for name, text in TEST_POLICIES.items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture(scope="session")
def guard_server(vllm_server, policy_dir, tmp_path_factory):
    process = GuardProcess(
        policy_dir, [vllm_server.url], log_path=tmp_path_factory.mktemp("guard") / "guard.log"
    )
    try:
        process.wait_serving()
        yield process
    finally:
        process.terminate()


@pytest.fixture
def guard(guard_server):
    with GuardClient(guard_server.target) as client:
        yield client


@pytest.fixture
def openai_client(guard_server):
    """The official OpenAI SDK, unchanged, pointed at guard's HTTP door (open: any api_key)."""
    import openai

    with openai.OpenAI(base_url=f"{guard_server.http_url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client
