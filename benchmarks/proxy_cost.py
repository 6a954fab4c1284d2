"""guard's own CPU per request, against an upstream that answers at once.

    python -m benchmarks.proxy_cost                        # passthrough, gRPC unary + stream + HTTP
    python -m benchmarks.proxy_cost --profile              # and where the time goes (py-spy, guard's process)
    python -m benchmarks.proxy_cost --smoke                # seconds; what CI runs

Starts benchmarks.instant_upstream, `guard serve` in front of it (passthrough policy, logging at
WARNING), and the strongest baseline: a minimal proxy (grpc.aio servicer -> aiohttp -> the same
upstream -> protobuf reply; no policy, no metrics), which is what any Python gRPC proxy has to pay.
For each door and concurrency it sends the same chat request `--requests` times and reads the
proxy process's CPU time (all threads, user + system) before and after:

    cpu_ms_per_request = Δ CPU seconds / requests

which does not depend on what else the machine runs, unlike throughput. Latency and throughput
are reported too, with the load generator's own CPU per request, so a saturated generator shows.
Writes benchmarks/results/proxy_cost.json (and proxy_profile.txt with --profile).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import itertools
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

import grpc
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import percentile, stop_processes  # noqa: E402
from guard.upstream.launcher import free_port  # noqa: E402
from guard.v1 import guard_pb2 as pb  # noqa: E402
from guard.v1 import guard_pb2_grpc  # noqa: E402

QUESTION = "Name three things people often keep in a kitchen."
RESULTS = ROOT / "benchmarks" / "results"


def _wait_port(port: int, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout:.0f} s")


def start_upstream(tokens: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.instant_upstream", "--port", str(port), "--tokens", str(tokens)], cwd=ROOT)
    _wait_port(port)
    return process, f"http://127.0.0.1:{port}"


def start_guard(upstream: str, workdir: Path, *, extra: list[str] = ()) -> tuple[subprocess.Popen, int, int]:
    """guard serve; returns (process, grpc port, http port)."""
    grpc_port, http_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "guard.cli", "serve", "--upstream", upstream, "--model", "instant",
        "--port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "0",
        "--policies", str(ROOT / "policies"), "--log-level", "WARNING", *extra,
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=(workdir / "guard.log").open("wb"), stderr=subprocess.STDOUT)
    _wait_port(grpc_port, 120)
    _wait_port(http_port, 30)
    if "--workers" in extra:
        # The ports answer once the first worker binds: give the others time to join, or the
        # benchmark's connections all land on the first.
        time.sleep(10)
    return process, grpc_port, http_port


def start_minimal(upstream: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.proxy_cost", "--serve-minimal", str(port), upstream], cwd=ROOT)
    _wait_port(port)
    return process, port


# -- the minimal proxy baseline ---------------------------------------------------------------


async def serve_minimal(port: int, upstream: str) -> None:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))

    class Minimal(guard_pb2_grpc.GuardServicer):
        async def Generate(self, request, context):
            body = {"model": "instant", "messages": [{"role": m.role, "content": m.content} for m in request.messages.messages]}
            if request.sampling.HasField("max_tokens"):
                body["max_tokens"] = request.sampling.max_tokens
            async with session.post(f"{upstream}/v1/chat/completions", json=body) as response:
                payload = await response.json()
            choice = payload["choices"][0]
            return pb.GenerateResponse(
                text=choice["message"]["content"], finish_reason=choice["finish_reason"],
                usage=pb.Usage(prompt_tokens=payload["usage"]["prompt_tokens"], completion_tokens=payload["usage"]["completion_tokens"]),
            )

    server = grpc.aio.server()
    guard_pb2_grpc.add_GuardServicer_to_server(Minimal(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# -- load ---------------------------------------------------------------------------------------


def _request(max_tokens: int) -> pb.GenerateRequest:
    request = pb.GenerateRequest(policy="default", messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=QUESTION)]))
    request.sampling.max_tokens = max_tokens
    return request


async def _drive(call, requests: int, concurrency: int) -> list[float]:
    """`requests` calls of `call()`, `concurrency` at a time; their latencies in seconds."""
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _callers(target_port: int, http_port: int | None, max_tokens: int, channels: int = 8):
    """{door: async call}, and a closer. gRPC calls take turns over `channels` connections (each its own,
    not shared by grpc's default subchannel pool), so `guard serve --workers N` gets load on every worker."""
    import aiohttp

    options = [("grpc.use_local_subchannel_pool", 1)]
    opened = [grpc.aio.insecure_channel(f"127.0.0.1:{target_port}", options=options) for _ in range(channels)]
    stubs = itertools.cycle([guard_pb2_grpc.GuardStub(channel) for channel in opened])
    request = _request(max_tokens)

    async def unary() -> None:
        await next(stubs).Generate(request, timeout=30)

    async def stream() -> None:
        async for _ in next(stubs).GenerateStream(request, timeout=30):
            pass

    callers = {"grpc": unary, "grpc-stream": stream}
    session = None
    if http_port is not None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024))
        body = {"model": "guard/default", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens}

        async def http() -> None:
            async with session.post(f"http://127.0.0.1:{http_port}/v1/chat/completions", json=body) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")

        callers["http"] = http

    async def close() -> None:
        for channel in opened:
            await channel.close()
        if session is not None:
            await session.close()

    return callers, close


async def measure(pid: int, call, requests: int, concurrency: int, profile_to: Path | None = None, native: bool = False) -> dict:
    """Warm up, then time `requests` calls; with `profile_to`, py-spy samples the proxy while they run."""
    # The proxy and its children: `guard serve --workers N` is a supervisor and N workers.
    root = psutil.Process(pid)
    proxy = _Tree([root, *root.children(recursive=True)])
    me = psutil.Process()
    await _drive(call, max(20, requests // 10), concurrency)  # warm: connections, code paths
    sampler = None
    if profile_to is not None:
        # Only the thread holding the GIL, idle excluded: guard's Python work. Ctrl-C makes py-spy write.
        sampler = subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), "--rate", "250", "--gil", "--format", "raw", "-o", str(profile_to), *(["--native"] if native else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(1.0)
    proxy_before, me_before = proxy.cpu_times(), me.cpu_times()
    started = time.perf_counter()
    latencies = await _drive(call, requests, concurrency)
    wall = time.perf_counter() - started
    proxy_after, me_after = proxy.cpu_times(), me.cpu_times()
    if sampler is not None:
        sampler.send_signal(signal.SIGINT)
        sampler.wait(60)

    def cpu(before, after) -> float:
        return (after.user - before.user) + (after.system - before.system)

    return {
        "requests": requests,
        "concurrency": concurrency,
        "cpu_ms_per_request": cpu(proxy_before, proxy_after) / requests * 1e3,
        "loadgen_cpu_ms_per_request": cpu(me_before, me_after) / requests * 1e3,
        "requests_per_second": requests / wall,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
    }


class _Tree:
    """cpu_times() summed over processes (user and system)."""

    def __init__(self, processes: list[psutil.Process]) -> None:
        self.processes = processes

    def cpu_times(self):
        times = [p.cpu_times() for p in self.processes]
        return types.SimpleNamespace(user=sum(t.user for t in times), system=sum(t.system for t in times))


# -- where the time goes ------------------------------------------------------------------------


def summarize_profile(raw: Path, top: int = 40) -> str:
    """py-spy's collapsed stacks -> inclusive and self shares of guard's sampled time, by function."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        frames = stack.split(";")
        total += samples
        threads[frames[0]] += samples
        for frame in set(frames[1:]):
            inclusive[frame] += samples
        own[frames[-1]] += samples
    lines = [f"{total} samples (250 Hz, the thread holding the GIL; idle excluded)", "", "by thread:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in threads.most_common(8)]
    lines += ["", "inclusive (function and what it calls):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    lines += ["", "self (the function's own code):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------------------------


async def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="guard-proxy-cost-"))
    upstream_process, upstream = start_upstream(args.tokens)
    processes = [upstream_process]
    rows = []
    profiles: list[tuple[str, Path]] = []
    try:
        minimal_process, minimal_port = start_minimal(upstream)
        processes.append(minimal_process)
        guard_process, grpc_port, http_port = start_guard(upstream, workdir, extra=args.guard_args)
        processes.append(guard_process)
        guard_calls, close_guard = _callers(grpc_port, http_port, args.tokens)
        minimal_calls, close_minimal = _callers(minimal_port, None, args.tokens)
        for concurrency in args.concurrency:
            # Interleaved per concurrency: the baseline first, then each door of guard.
            subjects = [("minimal-proxy", minimal_process.pid, "grpc", minimal_calls["grpc"])]
            subjects += [("guard", guard_process.pid, door, call) for door, call in guard_calls.items() if door in args.doors]
            for proxy, proxy_pid, door, call in subjects:
                profile_to = workdir / f"profile-{door}-c{concurrency}.txt" if args.profile and proxy == "guard" else None
                row = {"proxy": proxy, "door": door, **await measure(proxy_pid, call, args.requests, concurrency, profile_to, args.native)}
                if profile_to is not None:
                    profiles.append((f"guard {door} c={concurrency}", profile_to))
                rows.append(row)
                print(
                    f"{proxy:14} {door:12} c={concurrency:<3} {row['cpu_ms_per_request']:6.3f} ms CPU/req  "
                    f"{row['requests_per_second']:7.0f} req/s  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
                    f"(load generator {row['loadgen_cpu_ms_per_request']:.3f} ms/req)",
                    flush=True,
                )
        await close_guard()
        await close_minimal()
    finally:
        stop_processes(processes)
    if profiles:
        report = f"# {' '.join(['python -m benchmarks.proxy_cost', *sys.argv[1:]])} ({time.strftime('%Y-%m-%d')})\n"
        report += "".join(f"== {title}\n{summarize_profile(raw)}\n" for title, raw in profiles)
        (RESULTS / "proxy_profile.txt").write_text(report)
        print(report)
    for row in rows:
        if row["proxy"] == "guard":
            base = next(r for r in rows if r["proxy"] == "minimal-proxy" and r["concurrency"] == row["concurrency"])
            row["cpu_ratio_to_minimal_proxy"] = row["cpu_ms_per_request"] / base["cpu_ms_per_request"]
    return {
        "benchmark": "proxy_cost",
        "upstream": f"benchmarks.instant_upstream ({args.tokens}-token canned answer)",
        "policy": "default (passthrough)",
        "baseline": "minimal-proxy: grpc.aio servicer -> aiohttp -> same upstream, no policy or metrics",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "guard_args": args.guard_args,
        "rows": rows,
        "headlines": [
            headline
            for row in rows
            if row["proxy"] == "guard" and row["concurrency"] == max(args.concurrency)
            for headline in (
                {"name": f"guard CPU per passthrough request, {row['door']}, c={row['concurrency']}",
                 "value": round(row["cpu_ms_per_request"], 3), "unit": "ms"},
                {"name": f"the same ÷ the minimal proxy's, {row['door']}, c={row['concurrency']}",
                 "value": round(row["cpu_ratio_to_minimal_proxy"], 2), "unit": "×"},
            )
        ],
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-minimal":
        import uvloop

        uvloop.run(serve_minimal(int(sys.argv[2]), sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=16, help="tokens in each canned answer (stream events)")
    parser.add_argument("--doors", nargs="+", default=["grpc", "grpc-stream", "http"])
    parser.add_argument("--profile", action="store_true", help="sample guard with py-spy and summarize where its time goes")
    parser.add_argument("--native", action="store_true", help="with --profile: C frames too (grpc's core, aiohttp's parser)")
    parser.add_argument("--guard-args", nargs=argparse.REMAINDER, default=[], help="extra `guard serve` flags (last)")
    parser.add_argument("--smoke", action="store_true", help="seconds: 100 requests at concurrency 1, what CI runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "proxy_cost.json")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.concurrency, args.profile = 100, [1], False
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
