"""Shared by the benchmarks: a `guard serve` subprocess, the upstream model, latency summaries."""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from guard.upstream.launcher import free_port


def stop_processes(processes: Sequence[subprocess.Popen]) -> None:
    """Terminates what a benchmark started, last started first; kills what does not exit within 30 s."""
    for process in reversed(processes):
        process.terminate()
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def latency_row(values: list[float], baseline_median: float) -> dict[str, float]:
    """Median / p90 in ms and the ratio of the median to the same run's baseline median."""
    median = statistics.median(values)
    return {
        "median_ms": median * 1e3,
        "p90_ms": percentile(values, 0.9) * 1e3,
        "ratio_to_baseline": median / baseline_median,
        "overhead_ms": (median - baseline_median) * 1e3,
        "n": len(values),
    }


def start_guard(
    upstream: str, model: str, policy_dir: Path, log: Path, extra_args: Sequence[str] = ()
) -> tuple[subprocess.Popen, str]:
    """`guard serve` in front of `upstream`; returns the process and its gRPC target once SERVING.

    The HTTP door is off unless `extra_args` (appended to the `guard serve` command line; a later flag
    wins) turns it on, e.g. `--http-port N`: two benchmarks must not both want port 8080."""
    port = free_port()
    command = [
        sys.executable, "-m", "guard.cli", "serve", "--upstream", upstream, "--model", model,
        "--port", str(port), "--metrics-port", "0", "--policies", str(policy_dir), "--log-level", "WARNING",
        "--http-port", "-1", *extra_args,
    ]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    if subprocess.run([sys.executable, "-m", "guard.cli", "health", "--target", target, "--wait", "120"]).returncode:
        process.kill()
        raise SystemExit(f"guard did not start; see {log}")
    return process, target


def upstream_model(model_dir: str | None) -> tuple[str, str, str]:
    """(model directory, served name, dtype): the given directory in fp32, or the bundled Gemma in bf16."""
    if model_dir:
        return model_dir, "bench-model", "float32"
    from guard.upstream.default_model import DEFAULT_MODEL_NAME, prepare_default_model

    return str(prepare_default_model()), DEFAULT_MODEL_NAME, "bfloat16"
