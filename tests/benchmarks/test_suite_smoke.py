"""`python -m benchmarks.suite --smoke` end to end: each benchmark's JSON, the report and its plots appear.

The two benchmarks written elsewhere join once their modules exist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ["proxy_cost", "overhead"] + [name for name in ("step_cost", "peer_nemo") if (ROOT / "benchmarks" / f"{name}.py").exists()]


def test_the_smoke_suite_writes_json_a_report_and_plots(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--smoke", "--out", str(tmp_path), "--only", *BENCHMARKS],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert [(entry["name"], entry["status"]) for entry in suite["benchmarks"]] == [(name, "ok") for name in BENCHMARKS]
    for name in BENCHMARKS:
        assert json.loads((tmp_path / f"{name}.json").read_text())["benchmark"] == name
    report = (tmp_path / "REPORT.md").read_text()
    assert "python -m benchmarks.suite --smoke" in report
    for png in ("overhead_latency.png", "overhead_throughput.png", "proxy_cost_cpu.png"):
        assert (tmp_path / png).stat().st_size > 0
        assert f"]({png})" in report
