"""Suite-wide fixtures: tiny local models and one shared vLLM server.

Directory-specific fixtures belong in tests/<area>/conftest.py, not here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Before anything imports torch: on 2-core machines torch's default of one
# thread per core stalls for seconds (and vLLM, a separate process, binds its
# own threads). An explicit setting in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# `tests.support` must import however pytest was started (python -m pytest or pytest).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from tests.support.tiny_models import build_tiny_llama, build_tiny_reward_model  # noqa: E402

TINY_LLAMA_NAME = "tiny-llama"


@dataclass(frozen=True)
class VLLMServer:
    url: str  # e.g. http://127.0.0.1:PORT (no /v1)
    model: str  # served model name to put in requests
    log_path: Path | None = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever needs the real server is an integration test, so `-m "not integration"` skips it.
    for item in items:
        if "vllm_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
    # The soak saturates the shared vLLM for half a minute and leaves it warmed up; it runs last so that
    # every other test sees the server in the state it was started in.
    items.sort(key=lambda item: item.get_closest_marker("soak") is not None)


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """A random-weight LlamaForCausalLM + BPE tokenizer with a chat template (cached per user)."""
    return build_tiny_llama()


@pytest.fixture(scope="session")
def tiny_reward_dir() -> Path:
    """A random-weight LlamaForSequenceClassification (num_labels=1), same tokenizer."""
    return build_tiny_reward_model()


@pytest.fixture(scope="session")
def vllm_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """One vLLM server on the tiny Llama for the whole session (~30-40 s to start on 2 cores).

    Set GUARD_TEST_VLLM_URL (and optionally GUARD_TEST_VLLM_MODEL) to reuse a
    server that is already running instead.
    """
    if url := os.environ.get("GUARD_TEST_VLLM_URL"):
        yield VLLMServer(url=url.rstrip("/"), model=os.environ.get("GUARD_TEST_VLLM_MODEL", TINY_LLAMA_NAME))
        return
    # No skip when vLLM is missing: a suite that quietly drops its integration tests would look green.
    from guard.upstream.launcher import ManagedVLLM

    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    server = ManagedVLLM(
        tiny_llama_dir,
        max_model_len=512,
        dtype="float32",
        served_model_name=TINY_LLAMA_NAME,
        log_path=log_path,
    )
    with server:
        yield VLLMServer(url=server.url, model=server.served_model_name, log_path=log_path)
