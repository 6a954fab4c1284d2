"""guard's benchmark suite in one command: every benchmark, then REPORT.md and its plots.

    python -m benchmarks.suite                           # the full suite into benchmarks/results (tens of minutes)
    python -m benchmarks.suite --smoke                   # every benchmark's --smoke into a temporary directory; what CI runs
    python -m benchmarks.suite --only overhead proxy_cost [--out DIR]

Runs each benchmark of benchmarks.report.SUITE, one after another (they time things: never two at
once), as `python -m benchmarks.<name> [--smoke] --out DIR/<name>.json`, its output in DIR/<name>.log.
Writes DIR/suite.json (what ran, the exit status, seconds, command, the end of the log of a failure),
then benchmarks.report renders DIR/REPORT.md and the PNGs from DIR. A benchmark that fails or runs past
--timeout is reported as failed, the others still run, and the suite exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import RESULTS, SUITE, render, update_readme  # noqa: E402

LOG_TAIL_LINES = 30


def run_one(name: str, out: Path, smoke: bool, timeout: float) -> dict:
    target = out / f"{name}.json"
    command = [sys.executable, "-m", f"benchmarks.{name}", *(["--smoke"] if smoke else []), "--out", str(target)]
    shown = " ".join(["python", *command[1:]])
    log = out / f"{name}.log"
    print(f"== {name}: {shown}", flush=True)
    began, started = time.time(), time.perf_counter()
    with log.open("wb") as sink:
        # Its own process group, so a timeout reaches guard and the upstreams it started too.
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            returncode = "timeout"
            os.killpg(process.pid, signal.SIGINT)  # KeyboardInterrupt: its `finally` blocks stop what it started
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    seconds = time.perf_counter() - started
    # A zero exit without a fresh JSON is a failure too: the report would show stale or no numbers.
    ok = returncode == 0 and target.exists() and target.stat().st_mtime >= began
    entry = {"name": name, "status": "ok" if ok else "failed", "returncode": returncode, "seconds": round(seconds, 1),
             "command": shown, "log": log.name}
    if not ok:
        with log.open(errors="replace") as text:
            entry["log_tail"] = "".join(deque(text, maxlen=LOG_TAIL_LINES))
    print(f"   {entry['status']} in {seconds:.0f} s", flush=True)
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="each benchmark's --smoke (seconds each)")
    parser.add_argument("--only", nargs="+", choices=SUITE, metavar="NAME", help=f"a subset of {', '.join(SUITE)}")
    parser.add_argument("--out", type=Path, help="results directory (default: benchmarks/results; with --smoke a new temporary one)")
    parser.add_argument("--timeout", type=float, help="seconds per benchmark before it counts as failed (default: 300 smoke, 3600)")
    args = parser.parse_args()
    out = args.out or (Path(tempfile.mkdtemp(prefix="guard-bench-smoke-")) if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    timeout = args.timeout or (300.0 if args.smoke else 3600.0)
    names = [name for name in SUITE if not args.only or name in args.only]
    suite = {
        "command": " ".join(["python -m benchmarks.suite", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "smoke": args.smoke,
        "benchmarks": [],
    }
    for name in names:
        suite["benchmarks"].append(run_one(name, out, args.smoke, timeout))
        (out / "suite.json").write_text(json.dumps(suite, indent=1) + "\n")  # after each: a crash keeps what ran
    report = render(out)
    if out.resolve() == RESULTS.resolve() and not args.smoke:
        update_readme(out)  # README quotes the committed results: keep them in step
    failed = [entry["name"] for entry in suite["benchmarks"] if entry["status"] != "ok"]
    print(f"report: {report}" + (f"\nfailed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
