"""Time to first streamed text under an output filter, against passthrough streaming, in the same run.

    python benchmarks/stream_ttfb.py [--model-dir DIR] [--rounds 10] [--max-tokens 128]

Two policies stream the same greedy completion through one guard, interleaved round by round:
  - passthrough: no steps (the baseline: deltas are relayed as vLLM makes them);
  - moderated: safe-assistant's output filter (its pattern rules, holdback 192 characters, checked every 32).
The moderated stream releases text once holdback + one check's worth of characters exist, so its time to
first byte is the time the model takes to write ~224 characters; its total time should match passthrough.
Writes benchmarks/results/stream_ttfb.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import latency_row, start_guard, upstream_model  # noqa: E402
from guard.client import GuardClient  # noqa: E402
from guard.upstream.launcher import ManagedVLLM  # noqa: E402

PROMPT = "The history of the printing press begins"


def write_policies(directory: Path) -> None:
    shipped = yaml.safe_load((ROOT / "policies" / "safe-assistant.yaml").read_text())
    output_filter = next(step for step in shipped["steps"] if step["type"] == "output_filter")
    (directory / "passthrough.yaml").write_text("name: passthrough\n")
    (directory / "moderated.yaml").write_text(yaml.safe_dump({"name": "moderated", "steps": [output_filter]}))


def one_stream(guard: GuardClient, policy: str, max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    first_chars = 0
    for piece in guard.stream(PROMPT, policy=policy, max_tokens=max_tokens, temperature=0.0, timeout=300):
        if isinstance(piece, str) and piece and first is None:
            first, first_chars = time.perf_counter() - started, len(piece)
        final = piece
    return {"ttfb": first or 0.0, "total": time.perf_counter() - started, "first_chars": first_chars, "refused": final.refused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="model for vLLM (default: the bundled Gemma 3 270M)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stream_ttfb.json")
    args = parser.parse_args()

    model_dir, served, dtype = upstream_model(args.model_dir)
    workdir = Path(tempfile.mkdtemp(prefix="guard-ttfb-"))
    policies = workdir / "policies"
    policies.mkdir()
    write_policies(policies)
    runs: dict[str, list[dict[str, float]]] = {"passthrough": [], "moderated": []}
    with ManagedVLLM(model_dir, served_model_name=served, dtype=dtype, max_model_len=args.max_model_len, log_path=workdir / "vllm.log") as vllm:
        guard_process, target = start_guard(vllm.url, served, policies, workdir / "guard.log")
        try:
            with GuardClient(target) as guard:
                for policy in runs:  # warm-up
                    one_stream(guard, policy, 8)
                for _ in range(args.rounds):
                    for policy in runs:
                        runs[policy].append(one_stream(guard, policy, args.max_tokens))
        finally:
            guard_process.terminate()
            guard_process.wait(30)

    baseline_ttfb = statistics.median(r["ttfb"] for r in runs["passthrough"])
    baseline_total = statistics.median(r["total"] for r in runs["passthrough"])
    results = {
        policy: {
            "ttfb": latency_row([r["ttfb"] for r in rows], baseline_ttfb),
            "total": latency_row([r["total"] for r in rows], baseline_total),
            "first_delta_chars_median": statistics.median(r["first_chars"] for r in rows),
            "refused": sum(r["refused"] for r in rows),
        }
        for policy, rows in runs.items()
    }
    print(f"{args.rounds} interleaved rounds, {args.max_tokens} greedy tokens, model {served}")
    print("| policy | first text p50 | ÷ passthrough | whole stream p50 | ÷ passthrough | chars in the first delta |")
    print("| --- | --- | --- | --- | --- | --- |")
    for policy, row in results.items():
        print(
            f"| {policy} | {row['ttfb']['median_ms']:.0f} ms | {row['ttfb']['ratio_to_baseline']:.2f} | "
            f"{row['total']['median_ms']:.0f} ms | {row['total']['ratio_to_baseline']:.2f} | {row['first_delta_chars_median']:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": served, "results": results}, indent=1)
        + "\n"
    )


if __name__ == "__main__":
    main()
