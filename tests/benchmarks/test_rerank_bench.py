"""benchmarks/rerank_bench.py --smoke: every variant measured at every n, all agreeing with naive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.rerank_bench import VARIANTS, flops_per_request, strategy_from_rows

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_writes_every_variant_for_every_n_and_a_plot(tmp_path):
    out = tmp_path / "rerank.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "rerank_bench.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["agrees_with_naive"] is True
    assert report["setup"]["peak_tflops_measured"] > 0
    [(size, by_n)] = report["results"].items()
    assert size == "tiny" and list(by_n) == ["1", "2", "4"]
    for n, row in by_n.items():
        assert row["strongest_baseline"] in ("naive", "batched")
        for variant in VARIANTS:
            cell = row[variant]
            assert cell["agrees_with_naive"] is True, (n, variant, cell["max_diff_vs_naive"])
            assert cell["candidates_per_s"] > 0 and cell["mfu_shared_equivalent"] > 0
    assert out.with_suffix(".png").stat().st_size > 0


class _Config:
    hidden_size, num_hidden_layers = 8, 2


class _Model:
    config = _Config()

    def named_parameters(self):
        import torch

        return [("embed_tokens.weight", torch.zeros(100)), ("layer.weight", torch.zeros(10))]


def test_shared_work_counts_the_prompt_once_and_equals_whole_work_for_one_candidate():
    whole = flops_per_request(_Model(), 4, 512, 128, "whole")
    shared = flops_per_request(_Model(), 4, 512, 128, "shared")
    assert shared < whole
    # Embeddings are lookups, not matmuls: 10 parameters x 640 tokens x 2, plus attention.
    assert flops_per_request(_Model(), 1, 512, 128, "whole") == 2 * 10 * 640 + 4 * 8 * 2 * 640 * 641 / 2
    assert flops_per_request(_Model(), 1, 512, 128, "shared") == flops_per_request(_Model(), 1, 512, 128, "whole")


def test_auto_strategy_is_read_from_the_rows_its_passes_ran():
    assert strategy_from_rows(8, {9}) == "shared"  # a prefix row plus 8 suffixes
    assert strategy_from_rows(8, {8}) == "whole"
    assert strategy_from_rows(8, {8, 9}) is None  # changed its mind between iterations
    assert strategy_from_rows(1, {1}) == "whole"
