"""LoRA adapters per policy, against a vLLM stand-in: the managed vLLM's arguments, the load-time check (an
adapter vLLM does not serve rejects the policy with file, line and reason; the last good version keeps
serving), runtime loading of declared adapters, and requests under the policy asking vLLM for the adapter.
The same against the real vLLM: tests/integration/test_adapters_vllm.py."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import grpc
import httpx
import pytest

from guard.policy.loader import PolicyError, load_policy_file
from guard.policy.store import PolicyStore
from guard.upstream.adapters import Adapters, DeclaredAdapter, check_adapter_path, declared_adapters, vllm_lora_args
from guard.upstream.client import UpstreamClient
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc
from tests.support.inprocess import start_app
from tests.support.lora_upstream import LoRAUpstream


def write_adapter(directory: Path, r: int = 8, **config) -> Path:
    """What PEFT's save_pretrained writes that guard reads (the stand-in vLLM needs no weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, **config}))
    return directory


def write_policy(directory: Path, name: str, adapter: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(f"name: {name}\nsampling: {{max_tokens: 4}}\nadapter: {adapter}\n")
    return path


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        ("adapter: support-v2", ("support-v2", None)),
        ("adapter: {name: support-v2, path: adapters/v2}", ("support-v2", "adapters/v2")),
        ("adapter: 5", "2: adapter: expected an adapter name, or a mapping with name and path (got 5)"),
        ("adapter: {path: adapters/v2}", "2: adapter.name: missing required key 'name'"),
        ("adapter: {name: v2, pth: x}", "2: adapter.pth: unknown key 'pth' (did you mean 'path'? allowed: name, path)"),
        ("adapter: 'a=b'", "2: adapter: String should match pattern"),
        ("model: base\nadapter: v2", "3: adapter: set model or adapter, not both"),
    ],
)
def test_the_adapter_field_takes_a_name_or_a_declaration(tmp_path, text, outcome):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"name: p\n{text}\n")
    if isinstance(outcome, tuple):
        adapter = load_policy_file(policy).policy.adapter
        assert (adapter.name, adapter.path) == outcome
        return
    with pytest.raises(PolicyError) as raised:
        load_policy_file(policy)
    assert str(raised.value).startswith(f"{policy}:{outcome}")


def test_declared_adapters_are_what_the_managed_vllm_serves(tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    support = write_adapter(policies / "adapters" / "support-v2")
    legal = write_adapter(tmp_path / "elsewhere" / "legal", r=8, rank_pattern={"q_proj": 32})
    write_policy(policies, "a", "{name: support-v2, path: adapters/support-v2}")  # relative to the policy file
    write_policy(policies, "b", f"{{name: legal, path: '{legal}'}}")
    write_policy(policies, "c", "support-v2")  # names it: declares nothing
    write_policy(policies, "d", "{name: broken, path: adapters/missing}")  # no adapter there: left out
    write_policy(policies, "e", "{name: support-v2, path: adapters/other}")  # another path, same name: left out
    (policies / "f.yaml").write_text("name: f\nadapter: [not, a, mapping\n")  # the loader reports this one

    declared = declared_adapters(policies)

    assert declared == [DeclaredAdapter("support-v2", support.resolve(), 8), DeclaredAdapter("legal", legal.resolve(), 32)]
    assert vllm_lora_args(declared) == [
        "--enable-lora", "--max-lora-rank", "32", "--max-loras", "2",
        "--lora-modules", f"support-v2={support.resolve()}", f"legal={legal.resolve()}",
    ]  # fmt: skip
    # vLLM's default rank at least (room for adapters declared later), and LoRA off without adapters (on CPU it
    # turns torch.compile off).
    assert vllm_lora_args(declared[:1])[:3] == ["--enable-lora", "--max-lora-rank", "16"]
    assert vllm_lora_args([]) == []


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (None, "is not a PEFT adapter directory: it has no adapter_config.json"),
        ({"peft_type": "IA3"}, "not a LoRA adapter (peft_type 'IA3')"),
        ({"peft_type": "LORA", "r": 0}, "no valid rank 'r'"),
    ],
)
def test_a_declared_path_that_is_not_a_lora_adapter_is_rejected_at_its_line(tmp_path, config, reason):
    adapter = tmp_path / "adapters" / "x"
    adapter.mkdir(parents=True)
    if config is not None:
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    policy = tmp_path / "x.yaml"
    policy.write_text("name: x\nadapter:\n  name: x\n  path: adapters/x\n")
    with pytest.raises(PolicyError) as raised:
        load_policy_file(policy, build=check_adapter_path)
    assert str(raised.value).startswith(f"{policy}:4: adapter.path: ") and reason in str(raised.value)


async def store_over(upstream: LoRAUpstream, policies: Path, **options) -> tuple[PolicyStore, Adapters, UpstreamClient]:
    client = UpstreamClient([upstream.url])
    adapters = Adapters(client, policies, **options)
    store = PolicyStore(policies, build=adapters.check, prepare=adapters.prepare)
    await store.reload()
    return store, adapters, client


async def test_an_adapter_vllm_does_not_serve_is_a_policy_error_and_the_last_good_version_serves(tmp_path):
    with LoRAUpstream(adapters={"support-v2": "/adapters/support-v2"}) as upstream:
        policy = write_policy(tmp_path, "tuned", "support-v2")
        store, _, client = await store_over(upstream, tmp_path)
        try:
            good = store.get("tuned")
            assert good.policy.upstream_model("unused") == "support-v2" and not store.last_errors

            policy.write_text("name: tuned\nsampling: {max_tokens: 4}\nadapter: support-v3\n")
            await store.reload()

            assert store.get("tuned") is good  # the last good version keeps serving
            assert str(store.last_errors[str(policy)]) == (
                f"{policy}:3: adapter: upstream {upstream.url} does not serve adapter 'support-v3' "
                "(it serves: base-model, support-v2); declare it with a path, or start vLLM with --lora-modules"
            )
            base = write_policy(tmp_path, "base", "base-model")
            await store.reload()
            assert "'base-model' is a base model" in str(store.last_errors[str(base)]) and "use model: base-model" in str(store.last_errors[str(base)])
        finally:
            await client.close()


async def test_a_declared_adapter_is_loaded_into_vllm_before_its_policy_is_checked(tmp_path):
    adapter = write_adapter(tmp_path / "adapters" / "support-v2")
    with LoRAUpstream() as upstream:
        write_policy(tmp_path, "tuned", "{name: support-v2, path: adapters/support-v2}")
        store, _, client = await store_over(upstream, tmp_path)
        try:
            assert upstream.loads == [{"lora_name": "support-v2", "lora_path": str(adapter.resolve())}]
            assert store.get("tuned").policy.adapter.name == "support-v2" and not store.last_errors
            # Another policy naming the same adapter needs no second load; one giving the name another path is refused.
            write_policy(tmp_path, "again", "support-v2")
            other = write_adapter(tmp_path / "adapters" / "support-v2-retrained")
            clash = write_policy(tmp_path, "clash", f"{{name: support-v2, path: '{other}'}}")
            await store.reload()
            assert len(upstream.loads) == 1 and store.get("again")
            assert str(store.last_errors[str(clash)]) == (
                f"{clash}:3: adapter.path: upstream {upstream.url} serves adapter 'support-v2' from {adapter.resolve()}, "
                f"not {other.resolve()}: one name, two adapters (give each adapter version its own name)"
            )
        finally:
            await client.close()


async def test_a_vllm_that_restarted_without_a_declared_adapter_gets_it_back(tmp_path):
    write_adapter(tmp_path / "adapters" / "a")
    with LoRAUpstream() as upstream:
        write_policy(tmp_path, "tuned", "{name: a, path: adapters/a}")
        store, _, client = await store_over(upstream, tmp_path, recheck_seconds=0.0)
        try:
            del upstream.adapters["a"]  # vLLM restarted: runtime-loaded adapters are gone
            await store.reload()
            assert len(upstream.loads) == 2 and "a" in upstream.adapters and store.get("tuned")
        finally:
            await client.close()


async def test_a_failed_load_names_vllms_reason_and_is_not_retried_until_the_file_changes(tmp_path):
    with LoRAUpstream(runtime_loading=False) as upstream:
        write_adapter(tmp_path / "adapters" / "a")
        policy = write_policy(tmp_path, "tuned", "{name: a, path: adapters/a}")
        store, _, client = await store_over(upstream, tmp_path, recheck_seconds=0.0)
        try:
            error = str(store.last_errors[str(policy)])
            assert error.startswith(f"{policy}:3: adapter: upstream {upstream.url} could not load adapter 'a' from ")
            assert "HTTP 404" in error and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in error

            upstream.runtime_loading = True
            await store.reload()
            assert upstream.loads == [] and "tuned" not in {p.policy.name for p in store.list()}
            os.utime(policy, ns=(1, 1))  # an edit of the declaring file tries again
            await store.reload()
            assert len(upstream.loads) == 1 and store.get("tuned") and not store.last_errors
        finally:
            await client.close()


async def test_a_policy_waiting_for_its_adapter_serves_once_vllm_has_it(tmp_path):
    with LoRAUpstream() as upstream:
        write_policy(tmp_path, "tuned", "support-v2")
        store, _, client = await store_over(upstream, tmp_path, recheck_seconds=0.0)
        try:
            assert store.last_errors and not store.list()
            upstream.adapters["support-v2"] = "/adapters/support-v2"  # the operator loads it into vLLM
            await store.reload()  # the file is unchanged: guard reads it again because vLLM's list changed
            assert store.get("tuned") and not store.last_errors
        finally:
            await client.close()


async def test_without_an_answering_upstream_an_adapter_cannot_be_checked(tmp_path):
    client = UpstreamClient(["http://127.0.0.1:9"], connect_timeout=1.0)
    adapters = Adapters(client, tmp_path)
    policy = write_policy(tmp_path, "tuned", "support-v2")
    store = PolicyStore(tmp_path, build=adapters.check, prepare=adapters.prepare)
    try:
        await store.reload()
        assert str(store.last_errors[str(policy)]).startswith(
            f"{policy}:3: adapter: cannot check adapter 'support-v2': no upstream answered /v1/models (upstream http://127.0.0.1:9 unreachable"
        )
    finally:
        await client.close()


async def test_requests_under_an_adapter_policy_ask_vllm_for_the_adapter_on_both_doors(tmp_path):
    with LoRAUpstream(base="fault-model", adapters={"support-v2": "/adapters/support-v2"}) as upstream:
        write_policy(tmp_path, "tuned", "support-v2")
        app = await start_app(tmp_path, upstream.url)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = guard_pb2_grpc.GuardStub(channel)
                answer = await stub.Generate(pb.GenerateRequest(prompt="hi", policy="tuned"), timeout=10)
                plain = await stub.Generate(pb.GenerateRequest(prompt="hi", policy="default"), timeout=10)
                listed = await stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10)
            assert answer.text == "support-v2 says hi" and plain.text == "fault-model says hi"
            assert {p.name: p.model for p in listed.policies}["tuned"] == "support-v2"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}", timeout=10) as http:
                messages = [{"role": "user", "content": "hi"}]
                chat = await http.post("/v1/chat/completions", json={"model": "guard/tuned", "messages": messages})
                # The adapter's own name is no model guard serves: the default policy's base model would answer a
                # client that meant the adapter. It names the policy instead.
                by_adapter = await http.post("/v1/chat/completions", json={"model": "support-v2", "messages": messages})
                models = (await http.get("/v1/models")).json()["data"]
            assert chat.json()["choices"][0]["message"]["content"] == "support-v2 says hi" and by_adapter.status_code == 404
            assert {m["id"]: m["guard"]["upstream_model"] for m in models}["guard/tuned"] == "support-v2"
            assert upstream.models_asked == ["support-v2", "fault-model", "support-v2"]
        finally:
            await app.stop(grace=1)


async def test_a_policy_declaring_an_adapter_while_guard_runs_serves_after_a_reload(tmp_path):
    adapter = write_adapter(tmp_path / "adapters" / "late")
    with LoRAUpstream(base="fault-model") as upstream:
        app = await start_app(tmp_path, upstream.url)
        try:
            write_policy(tmp_path, "late", "{name: late, path: adapters/late}")
            for _ in range(50):
                if "late" in {loaded.policy.name for loaded in app.store.list()}:
                    break
                await asyncio.sleep(0.1)
            assert app.store.get("late") and upstream.adapters["late"] == str(adapter.resolve())
        finally:
            await app.stop(grace=1)
