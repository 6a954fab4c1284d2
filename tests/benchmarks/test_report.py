"""benchmarks/report.py on small synthetic results: headlines, tables with ratios, failures, missing fields, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.report import SUITE, fmt, render

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cpus": 2, "processor": "x86_64", "platform": "Linux-test"}


def overhead_rows() -> list[dict]:
    rows = []
    for concurrency, direct_rps in ((1, 10.0), (8, 40.0)):
        for mode in ("unary", "stream"):
            rows.append({"arm": "direct", "mode": mode, "concurrency": concurrency, "requests_per_second": direct_rps,
                         "p50_ms": 100.0, "p99_ms": 150.0, **({"ttft_p50_ms": 20.0} if mode == "stream" else {})})
            rows.append({"arm": "guard-grpc", "mode": mode, "concurrency": concurrency, "requests_per_second": direct_rps * 0.9,
                         "p50_ms": 102.5, "p99_ms": 160.0, "throughput_ratio_to_direct": 0.9, "added_p50_ms": 2.5,
                         "rounds_requests_per_second": [9.0, 9.1]})
    return rows


def write(results: Path, name: str, data: dict) -> None:
    (results / f"{name}.json").write_text(json.dumps(data))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    write(tmp_path, "overhead", {
        "benchmark": "overhead", "machine": MACHINE, "model": "tiny-model (float32)", "upstream": "vLLM",
        "baseline": "vLLM direct, same requests, same run", "date": "2026-01-01 00:00:00", "command": "python -m benchmarks.overhead",
        "rows": overhead_rows(), "loadgen_ceiling": [{"arm": "direct", "mode": "unary", "concurrency": 1, "requests_per_second": 3000.0}],
        "headlines": [{"name": "guard gRPC door, unary: added p50 at concurrency 1", "value": 2.5, "unit": "ms"}],
    })
    write(tmp_path, "proxy_cost", {
        "benchmark": "proxy_cost", "machine": MACHINE, "upstream": "instant upstream", "baseline": "minimal-proxy",
        "rows": [
            {"proxy": "minimal-proxy", "door": "grpc", "concurrency": 1, "cpu_ms_per_request": 0.5},
            {"proxy": "guard", "door": "grpc", "concurrency": 1, "cpu_ms_per_request": 1.5, "cpu_ratio_to_minimal_proxy": 3.0},
        ],
    })
    # A stale file of a benchmark the suite then saw fail: its numbers must not appear.
    write(tmp_path, "step_cost", {"benchmark": "step_cost", "rows": [{"step": "regex", "added_ms_per_step": 777.0}]})
    (tmp_path / "suite.json").write_text(json.dumps({
        "command": "python -m benchmarks.suite --smoke", "date": "2026-01-01 00:00:00",
        "benchmarks": [
            {"name": "proxy_cost", "status": "ok", "returncode": 0, "seconds": 12.0},
            {"name": "overhead", "status": "ok", "returncode": 0, "seconds": 20.0},
            {"name": "step_cost", "status": "failed", "returncode": 1, "seconds": 1.0, "command": "python -m benchmarks.step_cost --smoke",
             "log_tail": "Traceback (most recent call last):\nRuntimeError: upstream refused\n"},
        ],
    }))
    return tmp_path


def test_headlines_come_before_the_tables_and_name_their_benchmark(results: Path) -> None:
    text = render(results).read_text()
    headline = "- overhead: guard gRPC door, unary: added p50 at concurrency 1: **2.5 ms**"
    assert headline in text
    assert text.index(headline) < text.index("| concurrency | mode | arm |")


def test_the_report_names_its_command_machine_model_and_baseline(results: Path) -> None:
    text = render(results).read_text()
    assert "`python -m benchmarks.suite --smoke`" in text
    assert ("Machine: 2 CPUs, x86_64, Linux-test. Model / upstream: tiny-model (float32) / vLLM. "
            "Baseline: vLLM direct, same requests, same run.") in text
    assert "Command: `python -m benchmarks.overhead`." in text


def test_tables_carry_the_ratio_to_the_baseline(results: Path) -> None:
    text = render(results).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| concurrency | mode | arm |"))
    assert "throughput_ratio_to_direct" in header and "added_p50_ms" in header
    assert "| 8 | unary | guard-grpc | 36.0 | 0.9 |" in text
    assert "rounds_requests_per_second" not in text  # lists are not table cells
    assert "| concurrency | proxy | door | cpu_ms_per_request | cpu_ratio_to_minimal_proxy |" in text
    assert "| 1 | guard | grpc | 1.5 | 3 |" in text


def test_the_load_generator_ceiling_gets_its_own_table(results: Path) -> None:
    text = render(results).read_text()
    assert "`loadgen_ceiling`: The load generator alone" in text
    assert "| direct | unary | 1 | 3000 |" in text


def test_rows_without_a_comparison_are_divided_by_the_baseline_row_the_baseline_names(tmp_path: Path) -> None:
    rows = [{"subject": subject, "concurrency": c, "requests_per_second": rps, "p50_ms": p50}
            for c, scale in ((1, 1.0), (32, 2.0))
            for subject, rps, p50 in (("guard-grpc", 400.0 * scale, 2.0), ("nemo", 40.0 * scale, 20.0))]
    write(tmp_path, "peer_nemo", {"benchmark": "peer_nemo", "baseline": "NeMo Guardrails 0.24.1 server, regex input rail", "rows": rows})
    text = render(tmp_path).read_text()
    assert "| subject | requests_per_second ÷ baseline | p50_ms ÷ baseline | concurrency | requests_per_second | p50_ms |" in text
    assert "| guard-grpc | 10.0 | 0.1 | 32 | 800 | 2 |" in text
    assert "| nemo |  |  | 32 | 80.0 | 20.0 |" in text


def test_a_failed_benchmark_shows_its_failure_and_not_its_stale_numbers(results: Path) -> None:
    text = render(results).read_text()
    assert "| step_cost | failed (exit 1) |" in text
    assert "RuntimeError: upstream refused" in text
    assert "777" not in text
    assert not (results / "step_cost.png").exists()


def test_a_benchmark_without_results_is_listed_as_such(results: Path) -> None:
    text = render(results).read_text()
    assert "| peer_nemo | no results |" in text
    assert text.split("## peer_nemo", 1)[1].strip().startswith("No results in this directory.")


def test_plots_are_written_next_to_the_report_and_linked(results: Path) -> None:
    text = render(results).read_text()
    for name in ("overhead_latency.png", "overhead_throughput.png", "proxy_cost_cpu.png"):
        assert (results / name).read_bytes().startswith(PNG_MAGIC)
        assert f"]({name})" in text


def test_a_benchmark_with_few_fields_and_no_suite_run_still_renders(tmp_path: Path) -> None:
    write(tmp_path, "peer_nemo", {"benchmark": "peer_nemo", "machine": "a laptop",
                                  "rows": [{"proxy": "guard", "requests_per_second": 690.0}, {"proxy": "nemo", "requests_per_second": 39.0}]})
    text = render(tmp_path).read_text()
    assert "by `python -m benchmarks.report`" in text
    assert "Machine: a laptop. Model / upstream: not stated. Baseline: not stated." in text
    assert "| proxy | requests_per_second |" in text and "| nemo | 39.0 |" in text
    assert (tmp_path / "peer_nemo.png").read_bytes().startswith(PNG_MAGIC)
    assert "_no headlines_" in text
    assert [line for line in text.splitlines() if line.startswith("| ") and "no results" in line] == [
        f"| {name} | no results |  |  |" for name in SUITE if name != "peer_nemo"
    ]


def test_numbers_keep_about_three_significant_digits() -> None:
    assert [fmt(v) for v in (1234.56, 12.345, 1.2345, 0.012345, 7, None, "grpc")] == ["1235", "12.3", "1.23", "0.0123", "7", "", "grpc"]


def test_readme_quotes_the_committed_results_exactly():
    """README's benchmark headlines are generated from benchmarks/results; an edit by hand or a stale block fails here."""
    from benchmarks.report import README, README_END, README_START, RESULTS, readme_block

    text = README.read_text()
    block = text[text.index(README_START) : text.index(README_END) + len(README_END)]
    assert block == readme_block(RESULTS), "run `python -m benchmarks.report --readme`"


def test_update_readme_replaces_only_its_block(results: Path, tmp_path: Path):
    from benchmarks.report import README_END, README_START, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{README_START}\nstale 1.0 ms\n{README_END}\nafter\n")
    assert update_readme(results, readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "stale" not in text
    assert "guard gRPC door, unary: added p50 at concurrency 1: **2.5 ms**" in text
    readme.write_text("no block here\n")
    assert not update_readme(results, readme)
