"""Reward reached vs tokens generated: best_of_n with speculative_rejection vs plain best_of_n.

    python benchmarks/speculative_rejection.py                    # bundled Gemma 3 270M, embedding reward
    python benchmarks/speculative_rejection.py --n 8 --max-tokens 64 --prompts 8

One vLLM, one `guard serve` with two policies that differ only in early pruning:
  plain    best_of_n n=N: every candidate runs to max_tokens
  pruned   the same plus speculative_rejection {chunk_tokens, keep_fraction}
Each prompt/seed goes to both policies in shuffled order. Reported per policy: the chosen
candidate's reward (from the trace), completion tokens generated (usage), latency; and the
ratios pruned ÷ plain. Writes benchmarks/results/speculative_rejection.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path
from time import perf_counter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import start_guard, upstream_model  # noqa: E402
from guard.client import GuardClient  # noqa: E402
from guard.upstream.launcher import ManagedVLLM  # noqa: E402

QUESTIONS = [
    "Why is the sky blue?",
    "What do plants need to grow?",
    "How does a bicycle stay upright?",
    "Why do we have seasons on Earth?",
    "What is the difference between weather and climate?",
    "How do bees make honey?",
    "Why does ice float on water?",
    "What causes thunder?",
]


def policy(name: str, n: int, max_tokens: int, pruning: str) -> str:
    return (
        f"name: {name}\n"
        f"sampling: {{max_tokens: {max_tokens}}}\n"
        "steps:\n"
        "  - type: best_of_n\n"
        f"    n: {n}\n"
        "    temperature: 0.9\n"
        "    reward: {type: embedding}\n"
        f"{pruning}"
    )


def chosen_score(trace: dict) -> float:
    [select] = [s for s in trace["steps"] if s["type"] == "best_of_n" and s["phase"] == "select"]
    return float(select["detail"]["chosen_score"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="model for vLLM (default: the bundled Gemma 3 270M)")
    parser.add_argument("--max-model-len", type=int, default=1024, help="vLLM context length (at most the model's)")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--chunk-tokens", type=int, default=16)
    parser.add_argument("--keep-fraction", type=float, default=0.5)
    parser.add_argument("--prompts", type=int, default=8, help=f"questions used (at most {len(QUESTIONS)})")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per question")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speculative_rejection.json")
    args = parser.parse_args()

    model_dir, served, dtype = upstream_model(args.model_dir)

    workdir = Path(tempfile.mkdtemp(prefix="guard-sr-"))
    policy_dir = workdir / "policies"
    policy_dir.mkdir()
    (policy_dir / "plain.yaml").write_text(policy("plain", args.n, args.max_tokens, ""))
    (policy_dir / "pruned.yaml").write_text(
        policy(
            "pruned", args.n, args.max_tokens,
            f"    speculative_rejection: {{chunk_tokens: {args.chunk_tokens}, keep_fraction: {args.keep_fraction}}}\n",
        )
    )
    rows: dict[str, list[dict]] = {"plain": [], "pruned": []}
    with ManagedVLLM(model_dir, served_model_name=served, dtype=dtype, max_model_len=args.max_model_len, log_path=workdir / "vllm.log") as vllm:
        guard_process, target = start_guard(vllm.url, served, policy_dir, workdir / "guard.log")
        try:
            with GuardClient(target) as guard:
                prompt = f"Question: {QUESTIONS[0]}\nAnswer:"
                for name in rows:  # warm-up: the embedding model loads on first use
                    guard.generate(prompt, policy=name, seed=0, timeout=600)
                rng = random.Random(0)
                for question in QUESTIONS[: args.prompts]:
                    for seed in range(1, args.seeds + 1):
                        order = list(rows)
                        rng.shuffle(order)
                        for name in order:
                            started = perf_counter()
                            answer = guard.generate(
                                f"Question: {question}\nAnswer:", policy=name, seed=seed, trace=True, timeout=600
                            )
                            rows[name].append(
                                {
                                    "question": question,
                                    "seed": seed,
                                    "reward": chosen_score(answer.trace),
                                    "completion_tokens": answer.completion_tokens,
                                    "seconds": perf_counter() - started,
                                }
                            )
        finally:
            guard_process.terminate()
            guard_process.wait(30)

    summary = {
        name: {
            "mean_reward": statistics.mean(r["reward"] for r in values),
            "mean_completion_tokens": statistics.mean(r["completion_tokens"] for r in values),
            "median_seconds": statistics.median(r["seconds"] for r in values),
        }
        for name, values in rows.items()
    }
    plain, pruned = summary["plain"], summary["pruned"]
    ratios = {
        "tokens_pruned_over_plain": pruned["mean_completion_tokens"] / plain["mean_completion_tokens"],
        "latency_pruned_over_plain": pruned["median_seconds"] / plain["median_seconds"],
        "reward_pruned_minus_plain": pruned["mean_reward"] - plain["mean_reward"],
    }
    print(f"\n{served}: n={args.n}, max_tokens={args.max_tokens}, chunk={args.chunk_tokens}, keep={args.keep_fraction}, "
          f"{len(rows['plain'])} prompts")
    print(f"{'policy':8} {'mean reward':>12} {'tokens':>8} {'median s':>9}")
    for name, row in summary.items():
        print(f"{name:8} {row['mean_reward']:12.4f} {row['mean_completion_tokens']:8.1f} {row['median_seconds']:9.2f}")
    print(f"pruned ÷ plain: tokens {ratios['tokens_pruned_over_plain']:.3f}, latency {ratios['latency_pruned_over_plain']:.3f}; "
          f"reward difference {ratios['reward_pruned_minus_plain']:+.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "speculative_rejection", "model": served, "n": args.n, "max_tokens": args.max_tokens,
        "chunk_tokens": args.chunk_tokens, "keep_fraction": args.keep_fraction,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "summary": summary, "ratios": ratios, "rows": rows,
    }, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
