"""An HTTP/1.1-aware TCP proxy that injects upstream faults, for the soak (benchmarks/soak.py).

    python benchmarks/fault_proxy.py --upstream http://127.0.0.1:8000 --port 9000 --delay 0.05 --drop 0.03 ...

It sits between guard and vLLM and relays bytes unchanged, except that each response (or, with
`per_connection`, each connection) may draw one fault:

  delay      hold the response for `delay_seconds` (a random span in the range) before its first byte;
  drop       close both sides once the upstream has answered, before any of the response is relayed;
  drop_mid   relay the head and part of the body, then close both sides (a stream is cut mid-way; a
             chunked body never gets its terminating chunk);
  corrupt    flip one byte in every piece of body data; the head and chunked framing stay intact, so the
             reader still sees a well-framed response with garbage in it.

Only requests whose path starts with one of `paths` (default: /v1/) are faulted: guard's /health probes
pass through, so faults hit requests rather than guard's view of the upstream's health.
Framing is parsed just enough to find where each response's body ends (Content-Length, chunked, or
until close); the request side is parsed the same way to pair each response with its request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

KINDS = ("delay", "drop", "drop_mid", "corrupt")
_READ = 64 * 1024


@dataclass
class Faults:
    """Probabilities (each in [0, 1], summing to at most 1) of each fault per response or per connection."""

    delay: float = 0.0
    drop: float = 0.0
    drop_mid: float = 0.0
    corrupt: float = 0.0
    delay_seconds: tuple[float, float] = (1.0, 3.0)
    per_connection: bool = False
    paths: tuple[str, ...] = ("/v1/",)
    seed: int | None = None

    def __post_init__(self) -> None:
        chances = [getattr(self, kind) for kind in KINDS]
        if any(not 0.0 <= p <= 1.0 for p in chances) or sum(chances) > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities must be in [0, 1] and sum to at most 1: {dict(zip(KINDS, chances))}")

    def draw(self, rng: random.Random) -> str | None:
        roll = rng.random()
        for kind in KINDS:
            roll -= getattr(self, kind)
            if roll < 0:
                return kind
        return None


@dataclass
class Head:
    raw: bytes
    first_line: str
    headers: dict[str, str]  # lower-cased names; a repeated header keeps its last value

    @property
    def status(self) -> int:
        return int(self.first_line.split(" ", 2)[1])


async def read_head(reader: asyncio.StreamReader) -> Head | None:
    """The start line and headers (up to the blank line); None at a clean end of the connection."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionError("connection closed inside a message head") from exc
        return None
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Head(raw, lines[0], headers)


async def body_pieces(reader: asyncio.StreamReader, head: Head, *, has_body: bool = True) -> AsyncIterator[tuple[str, bytes]]:
    """The body as (kind, bytes): kind "data" (payload), "framing" (chunk sizes, CRLFs) or "end"
    (the terminating chunk and trailers). Relaying every piece in order reproduces the body exactly."""
    if not has_body:
        return
    if "chunked" in head.headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                trailers = size_line
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    trailers += line
                yield "end", trailers + b"\r\n"
                return
            yield "framing", size_line
            yield "data", await reader.readexactly(size)
            yield "framing", await reader.readexactly(2)
    elif "content-length" in head.headers:
        left = int(head.headers["content-length"])
        while left > 0:
            piece = await reader.read(min(left, _READ))
            if not piece:
                raise ConnectionError("connection closed inside a body")
            left -= len(piece)
            yield "data", piece
    elif not head.first_line.startswith("HTTP/"):
        return  # a request without Content-Length or chunking has no body
    else:
        while piece := await reader.read(_READ):  # a response delimited by closing the connection
            yield "data", piece


def flip_byte(data: bytes, rng: random.Random) -> bytes:
    """`data` with one byte XOR-ed with a random non-zero mask (so it always changes)."""
    if not data:
        return data
    at = rng.randrange(len(data))
    return data[:at] + bytes([data[at] ^ rng.randrange(1, 256)]) + data[at + 1 :]


class FaultProxy:
    """Listens on `host:port` (0: any free port) and relays to `upstream` (http://host:port), injecting `faults`."""

    def __init__(self, upstream: str, faults: Faults | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        target = urlsplit(upstream if "//" in upstream else f"http://{upstream}")
        self.upstream_host, self.upstream_port = target.hostname or "127.0.0.1", target.port or 80
        self.faults = faults or Faults()
        self.host, self.port = host, port
        # Responses by fault ("none": untouched), and connections; every key exists from the start, so a
        # reader in another thread never sees the dict change size.
        self.stats: Counter[str] = Counter(dict.fromkeys(("connections", "none", *KINDS), 0))
        self._rng = random.Random(self.faults.seed)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._connections.add(task := asyncio.current_task())
        self.stats["connections"] += 1
        upstream_writer = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            requests: deque[tuple[str, str]] = deque()  # (method, path) of requests whose response has not begun
            fault = self.faults.draw(self._rng) if self.faults.per_connection else None
            relays = [
                asyncio.create_task(self._requests(client_reader, upstream_writer, requests)),
                asyncio.create_task(self._responses(upstream_reader, client_writer, requests, fault)),
            ]
            try:
                # Either side ending (or a drop) ends the connection: close both sides.
                await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for relay in relays:
                    relay.cancel()
                await asyncio.gather(*relays, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): the connection's task is the top of its stack, nothing awaits it
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
            self._connections.discard(task)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: deque[tuple[str, str]]) -> None:
        while (head := await read_head(reader)) is not None:
            method, _, rest = head.first_line.partition(" ")
            requests.append((method, rest.partition(" ")[0]))
            writer.write(head.raw)
            async for _, piece in body_pieces(reader, head):
                writer.write(piece)
            await writer.drain()

    async def _responses(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: deque[tuple[str, str]], connection_fault: str | None
    ) -> None:
        while (head := await read_head(reader)) is not None:
            if 100 <= head.status < 200:  # interim: the final response follows
                writer.write(head.raw)
                continue
            method, path = requests.popleft() if requests else ("", "")
            fault = None
            if path.startswith(self.faults.paths):
                fault = connection_fault if self.faults.per_connection else self.faults.draw(self._rng)
            self.stats[fault or "none"] += 1
            if fault == "delay":
                await asyncio.sleep(self._rng.uniform(*self.faults.delay_seconds))
            elif fault == "drop":
                return
            has_body = method != "HEAD" and head.status not in (204, 304)
            cut = self._rng.randrange(max(1, int(head.headers.get("content-length") or 600))) if fault == "drop_mid" else None
            writer.write(head.raw)
            sent = 0
            async for kind, piece in body_pieces(reader, head, has_body=has_body):
                if cut is not None and (kind == "end" or (kind == "data" and sent + len(piece) > cut)):
                    writer.write(piece[: cut - sent] if kind == "data" else b"")
                    await writer.drain()
                    return
                if kind == "data":
                    sent += len(piece)
                    if fault == "corrupt":
                        piece = flip_byte(piece, self._rng)
                writer.write(piece)
                await writer.drain()
            if cut is not None:  # the body ended (it was empty) before the cut: close anyway
                return
            if "close" in head.headers.get("connection", "").lower():
                return


class ProxyThread:
    """A FaultProxy on its own event loop in a daemon thread, so that a busy caller cannot stall the relay."""

    def __init__(self, upstream: str, faults: Faults | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.proxy = FaultProxy(upstream, faults, host=host, port=port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def stats(self) -> dict[str, int]:
        return dict(self.proxy.stats)

    def start(self) -> ProxyThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="http://host:port to relay to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    for kind in KINDS:
        parser.add_argument(f"--{kind.replace('_', '-')}", type=float, default=0.0, help=f"probability of {kind}")
    parser.add_argument("--delay-seconds", type=float, nargs=2, default=(1.0, 3.0), metavar=("MIN", "MAX"))
    parser.add_argument("--per-connection", action="store_true", help="draw once per connection instead of per response")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    faults = Faults(
        **{kind: getattr(args, kind) for kind in KINDS},
        delay_seconds=tuple(args.delay_seconds), per_connection=args.per_connection, seed=args.seed,
    )

    async def serve() -> None:
        async with FaultProxy(args.upstream, faults, host=args.host, port=args.port) as proxy:
            print(f"relaying {proxy.url} -> {args.upstream} with {faults}", flush=True)
            try:
                await asyncio.Event().wait()
            finally:
                print(dict(proxy.stats), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
