"""benchmarks/fault_proxy.py against a tiny local HTTP/1.1 server: exact relay, drops, corruption, delays."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from benchmarks.fault_proxy import FaultProxy, Faults, ProxyThread, body_pieces, flip_byte, read_head

JSON_BODY = json.dumps({"choices": [{"text": "hello world " * 20, "finish_reason": "stop"}]}).encode()
EVENTS = [b'data: {"choices": [{"text": "piece %d "}]}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]


def fixed_response() -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(JSON_BODY) + JSON_BODY


def chunked_response() -> bytes:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in EVENTS)
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


RESPONSES = {"/v1/fixed": fixed_response(), "/v1/stream": chunked_response(), "/health": b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"}


class TinyServer:
    """Keep-alive HTTP/1.1: answers each request with RESPONSES[path]; counts connections the client closed."""

    def __init__(self) -> None:
        self.closed_by_peer = 0
        self.bodies: list[bytes] = []

    async def __aenter__(self) -> TinyServer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_peer += 1
                    return
                lines = head.decode().split("\r\n")
                length = next((int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:")), 0)
                self.bodies.append(await reader.readexactly(length))
                writer.write(RESPONSES[lines[0].split(" ")[1]])
                await writer.drain()
        except ConnectionError:
            self.closed_by_peer += 1
        finally:
            writer.close()


def request(path: str, body: bytes = b"") -> bytes:
    method = "POST" if body else "GET"
    return f"{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body


async def exchange(url: str, path: str, body: bytes = b"", expected: bytes | None = None, timeout: float = 3.0) -> bytes:
    """Sends one request on a fresh connection; reads `len(expected)` bytes or until the proxy closes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request(path, body))
        await writer.drain()
        received = b""
        async with asyncio.timeout(timeout):
            while expected is None or len(received) < len(expected):
                piece = await reader.read(65536)
                if not piece:
                    break
                received += piece
        return received
    finally:
        writer.close()


async def until(condition, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_pass_through_is_byte_exact_on_one_keep_alive_connection():
    async with TinyServer() as server, FaultProxy(server.url) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        expected = b""
        for path, body in [("/v1/fixed", b'{"prompt": "hi"}'), ("/v1/stream", b"{}"), ("/health", b""), ("/v1/fixed", b"x" * 100_000)]:
            writer.write(request(path, body))
            expected += RESPONSES[path]
        await writer.drain()
        received = await asyncio.wait_for(reader.readexactly(len(expected)), 3)
        writer.close()
        assert received == expected
        assert server.bodies == [b'{"prompt": "hi"}', b"{}", b"", b"x" * 100_000]
        assert proxy.stats["none"] == 4 and proxy.stats["connections"] == 1


@pytest.mark.parametrize("path", ["/v1/fixed", "/v1/stream"])
async def test_drop_closes_both_sides_before_the_response(path):
    async with TinyServer() as server, FaultProxy(server.url, Faults(drop=1.0)) as proxy:
        assert await exchange(proxy.url, path, b"{}") == b""
        await until(lambda: server.closed_by_peer == 1)
        assert proxy.stats["drop"] == 1


@pytest.mark.parametrize("path", ["/v1/fixed", "/v1/stream"])
async def test_drop_mid_relays_the_head_and_part_of_the_body_then_closes(path):
    full = RESPONSES[path]
    head_length = full.index(b"\r\n\r\n") + 4
    for seed in range(5):
        async with TinyServer() as server, FaultProxy(server.url, Faults(drop_mid=1.0, seed=seed)) as proxy:
            received = await exchange(proxy.url, path, b"{}")
            assert received[:head_length] == full[:head_length]
            assert len(received) < len(full) and full.startswith(received)
            await until(lambda: server.closed_by_peer == 1)


async def test_corrupt_changes_body_bytes_only():
    async with TinyServer() as server, FaultProxy(server.url, Faults(corrupt=1.0, seed=3)) as proxy:
        for path in ("/v1/fixed", "/v1/stream"):
            full = RESPONSES[path]
            received = await exchange(proxy.url, path, b"{}", expected=full)
            head_length = full.index(b"\r\n\r\n") + 4
            assert received[:head_length] == full[:head_length]
            assert len(received) == len(full) and received != full
            # The framing is intact: the same pieces, each data piece with exactly one byte changed.
            pieces = await parse_pieces(full), await parse_pieces(received)
            assert [kind for kind, _ in pieces[0]] == [kind for kind, _ in pieces[1]]
            for (kind, original), (_, relayed) in zip(*pieces):
                if kind == "data":
                    assert sum(a != b for a, b in zip(original, relayed)) == 1
                else:
                    assert original == relayed


async def parse_pieces(response: bytes) -> list[tuple[str, bytes]]:
    reader = asyncio.StreamReader()
    reader.feed_data(response)
    reader.feed_eof()
    head = await read_head(reader)
    return [piece async for piece in body_pieces(reader, head)]


async def test_delay_holds_the_response_then_relays_it_unchanged():
    async with TinyServer() as server, FaultProxy(server.url, Faults(delay=1.0, delay_seconds=(0.3, 0.3))) as proxy:
        started = time.monotonic()
        received = await exchange(proxy.url, "/v1/fixed", b"{}", expected=RESPONSES["/v1/fixed"])
        assert time.monotonic() - started >= 0.3
        assert received == RESPONSES["/v1/fixed"]


async def test_paths_outside_the_faulted_prefixes_pass_untouched():
    async with TinyServer() as server, FaultProxy(server.url, Faults(drop=1.0)) as proxy:
        assert await exchange(proxy.url, "/health", expected=RESPONSES["/health"]) == RESPONSES["/health"]
        assert proxy.stats["none"] == 1 and proxy.stats["drop"] == 0


async def test_per_connection_draws_once_for_every_response_on_it():
    async with TinyServer() as server, FaultProxy(server.url, Faults(corrupt=0.5, per_connection=True, seed=1)) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        for _ in range(6):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request("/v1/fixed", b"{}") * 3)
            received = await asyncio.wait_for(reader.readexactly(3 * len(RESPONSES["/v1/fixed"])), 3)
            writer.close()
            changed = {received[i * len(fixed_response()) :][: len(fixed_response())] != fixed_response() for i in range(3)}
            assert len(changed) == 1  # all three corrupted, or none
        assert proxy.stats["corrupt"] % 3 == 0 and proxy.stats["corrupt"] + proxy.stats["none"] == 18


def test_proxy_thread_relays_for_a_caller_in_another_loop():
    async def scenario() -> bytes:
        async with TinyServer() as server:
            proxy = ProxyThread(server.url).start()
            try:
                return await exchange(proxy.url, "/v1/fixed", b"{}", expected=RESPONSES["/v1/fixed"])
            finally:
                proxy.stop()

    assert asyncio.run(scenario()) == RESPONSES["/v1/fixed"]


def test_faults_draw_in_proportion_and_reject_impossible_probabilities():
    rng = random.Random(0)
    faults = Faults(delay=0.1, drop=0.2, corrupt=0.3)
    draws = [faults.draw(rng) for _ in range(10_000)]
    assert abs(draws.count("drop") / 10_000 - 0.2) < 0.02 and draws.count("drop_mid") == 0
    assert abs(draws.count(None) / 10_000 - 0.4) < 0.02
    with pytest.raises(ValueError):
        Faults(drop=0.7, corrupt=0.7)
    assert flip_byte(b"abc", rng) != b"abc" and len(flip_byte(b"abc", rng)) == 3
