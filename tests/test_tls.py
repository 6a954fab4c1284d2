"""TLS and mTLS on both doors, with a throwaway CA; the metrics port can stay on loopback."""

from __future__ import annotations

import asyncio
import ssl

import grpc
import httpx
import openai
import pytest

from guard.client import GuardClient
from guard.settings import Settings
from tests.support.certs import make_certs
from tests.support.fault_upstream import FaultUpstream
from tests.support.inprocess import start_app


@pytest.fixture
def fault():
    with FaultUpstream("slow_ok", hang_seconds=0.0) as upstream:
        yield upstream


async def start(tmp_path, fault, **settings):
    return await start_app(tmp_path, fault.url, **settings)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


async def test_tls_on_both_doors(tmp_path, fault, certs):
    app = await start(tmp_path, fault, tls_cert=certs.server_cert, tls_key=certs.server_key)
    try:
        # Blocking clients, as users have them: in a thread, since guard serves on this test's event loop.
        await asyncio.to_thread(tls_clients, app, certs)
    finally:
        await app.stop(grace=1)


def tls_clients(app, certs) -> None:
    with GuardClient(f"localhost:{app.port}", tls_ca=certs.ca) as guard:
        assert guard.generate("hi", timeout=10).text == "late but fine"
    with GuardClient(f"127.0.0.1:{app.port}") as plaintext, pytest.raises(grpc.RpcError) as raised:
        plaintext.generate("hi", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    with openai.OpenAI(
        base_url=f"https://localhost:{app.http_port}/v1", api_key="unused", max_retries=0,
        http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(certs.ca))),
    ) as client:
        reply = client.chat.completions.create(model="guard/default", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "late but fine"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{app.http_port}/health", timeout=5)


async def test_mtls_needs_a_client_certificate_on_both_doors(tmp_path, fault, certs):
    app = await start(
        tmp_path, fault, tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca
    )
    try:
        await asyncio.to_thread(mtls_clients, app, certs)
    finally:
        await app.stop(grace=1)


def mtls_clients(app, certs) -> None:
    with GuardClient(f"localhost:{app.port}", tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key) as guard:
        assert guard.generate("hi", timeout=10).text == "late but fine"
    with GuardClient(f"localhost:{app.port}", tls_ca=certs.ca) as anonymous, pytest.raises(grpc.RpcError) as raised:
        anonymous.generate("hi", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    context = ssl.create_default_context(cafile=str(certs.ca))
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"https://localhost:{app.http_port}/health", verify=context, timeout=5)
    context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    assert httpx.get(f"https://localhost:{app.http_port}/health", verify=context, timeout=5).status_code == 200


def test_tls_settings_are_checked_together(certs):
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        Settings(tls_cert=certs.server_cert)
    with pytest.raises(ValueError, match="needs --tls-cert"):
        Settings.from_env({}, tls_client_ca=certs.ca)
