"""A retrieval policy through guard assembled in-process: both doors carry the sources, vLLM's request carries the
chunk, and an index rebuilt on disk serves the next request without a restart."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from guard.client import GuardClient
from guard.retrieval.build import build_index
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc
from tests.support.candidates_upstream import CandidatesUpstream
from tests.support.inprocess import start_app
from tests.support.manuals import MANUALS, write_manuals

ANSWER = "A full charge takes 4 hours from empty [1]."
QUESTION = "How long does the Aurora vacuum take to charge?"


@pytest.fixture
def upstream():
    with CandidatesUpstream([ANSWER]) as server:
        yield server


@pytest.fixture
async def app(tmp_path, upstream):
    index = build_index(write_manuals(tmp_path / "docs"), tmp_path / "manuals.index").path
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "manuals.yaml").write_text(f"name: manuals\nsteps:\n  - {{type: retrieve, index: {index}, top_k: 2}}\n")
    (policies / "grounded.yaml").write_text(
        f"name: grounded\nsteps:\n  - {{type: retrieve, index: {index}, top_k: 2}}\n  - {{type: grounding_check}}\n"
    )
    started = await start_app(policies, upstream.url)
    yield started
    await started.stop(grace=1)


def system_sent(upstream: CandidatesUpstream) -> str:
    messages = upstream.bodies[-1]["messages"]
    assert messages[0]["role"] == "system"
    return messages[0]["content"]


async def test_both_doors_return_the_sources_and_vllm_receives_the_chunk(app, upstream):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = guard_pb2_grpc.GuardStub(channel)
        request = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=QUESTION)]), policy="manuals")
        answer = await stub.Generate(request, timeout=30)
        assert answer.text == ANSWER
        first = answer.sources[0]
        assert (first.number, first.id, first.document, first.cited) == (1, "aurora-x200.md#0", "aurora-x200.md", True)
        assert "4 hours from empty" in first.text and first.text in system_sent(upstream)
        assert [s.cited for s in answer.sources[1:]] == [False] * (len(answer.sources) - 1)
        # A stream carries them on its final message (this policy's grounding check needs the whole answer first).
        grounded = pb.GenerateRequest(messages=request.messages, policy="grounded", include_trace=True)
        *pieces, final = [message async for message in stub.GenerateStream(grounded, timeout=30)]
        assert "".join(p.text for p in pieces) + final.text == ANSWER
        assert [s.id for s in final.sources] == [s.id for s in answer.sources]
        [check] = [step for step in final.trace.steps if step.type == "grounding_check"]
        assert check.detail["grounded"] is True

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
        body = {"model": "guard/manuals", "messages": [{"role": "user", "content": QUESTION}]}
        response = (await client.post("/v1/chat/completions", json=body)).json()
        [source, *_] = response["choices"][0]["guard"]["sources"]
        assert (source["number"], source["id"], source["cited"]) == (1, "aurora-x200.md#0", True)
        assert set(source) == {"number", "id", "document", "heading", "text", "score", "cited"}
        plain = (await client.post("/v1/chat/completions", json={**body, "model": "guard/default"})).json()
        assert "sources" not in plain["choices"][0]["guard"]

    def ask() -> list:
        with GuardClient(f"127.0.0.1:{app.port}") as guard:
            return guard.generate([("user", QUESTION)], policy="manuals").sources

    sources = await asyncio.to_thread(ask)
    assert sources[0].id == "aurora-x200.md#0" and sources[0].cited and sources[0].number == 1


async def test_a_rebuilt_index_answers_the_next_request_without_a_restart(app, upstream, tmp_path):
    question = "How do I fold the Zephyr Z9 drone's propellers?"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = guard_pb2_grpc.GuardStub(channel)
        request = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=question)]), policy="manuals")
        before = await stub.Generate(request, timeout=30)
        assert all(not s.document.startswith("zephyr") for s in before.sources)

        manuals = {**MANUALS, "zephyr-z9.md": "# Zephyr Z9 drone\n\n## Folding\nFold the Z9's propellers inwards, rear arms first, then the front arms.\n"}
        await asyncio.to_thread(build_index, write_manuals(tmp_path / "docs", manuals), tmp_path / "manuals.index")
        for _ in range(100):
            await asyncio.sleep(0.1)
            after = await stub.Generate(request, timeout=30)
            if after.sources and after.sources[0].document == "zephyr-z9.md":
                break
        assert after.sources[0].id == "zephyr-z9.md#0" and "rear arms first" in system_sent(upstream)
