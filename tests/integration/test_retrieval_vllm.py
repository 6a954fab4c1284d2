"""A retrieval policy through a real guard process and the real vLLM: the chat template takes the sources block,
vLLM is billed for the chunk it was sent, and the answer names its sources through both doors."""

from __future__ import annotations

import pytest

from guard.client import GuardClient
from guard.retrieval.build import build_index
from tests.support.guard_process import GuardProcess
from tests.support.manuals import write_manuals

pytestmark = pytest.mark.integration

QUESTION = "How often should I descale the Nimbus K7 espresso machine?"


@pytest.fixture(scope="module")
def rag_guard(vllm_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    index = build_index(write_manuals(root / "docs"), root / "manuals.index").path
    policies = root / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text("name: default\nsampling: {temperature: 0.0, max_tokens: 4}\n")
    (policies / "manuals.yaml").write_text(
        f"name: manuals\nsampling: {{temperature: 0.0, max_tokens: 4}}\nsteps:\n  - {{type: retrieve, index: {index}, top_k: 1}}\n"
    )
    process = GuardProcess(policies, [vllm_server.url], model=vllm_server.model, log_path=root / "guard.log")
    try:
        process.wait_serving()
        yield process
    finally:
        process.terminate()


def test_vllm_receives_the_chunk_and_the_answer_names_its_source(rag_guard):
    with GuardClient(rag_guard.target) as guard:
        plain = guard.generate([("user", QUESTION)], policy="default")
        grounded = guard.generate([("user", QUESTION)], policy="manuals")
    [source] = grounded.sources
    assert source.id == "nimbus-k7.md#1" and "every 200 shots" in source.text and source.number == 1
    assert not grounded.refused and plain.sources == []
    # vLLM tokenised the instruction and the chunk: tens of tokens more than the bare question.
    assert grounded.prompt_tokens > plain.prompt_tokens + 40


def test_the_http_door_carries_the_sources(rag_guard):
    import openai

    with openai.OpenAI(base_url=f"{rag_guard.http_url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        reply = client.chat.completions.create(model="guard/manuals", messages=[{"role": "user", "content": QUESTION}])
    [source] = reply.choices[0].model_extra["guard"]["sources"]
    assert source["id"] == "nimbus-k7.md#1" and reply.choices[0].finish_reason in ("stop", "length")
