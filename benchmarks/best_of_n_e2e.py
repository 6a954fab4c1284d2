"""best_of_n end to end: request latency with n=4 vs n=1 through guard, same upstream, same run, interleaved.

    python benchmarks/best_of_n_e2e.py                          # bundled Gemma 3 270M (prepared if missing)
    python benchmarks/best_of_n_e2e.py --rounds 10 --max-tokens 32
    python benchmarks/best_of_n_e2e.py --model-dir DIR           # another local HF model (float32)

Starts one vLLM and one `guard serve` over a temporary policy directory with
  default   passthrough (no steps): the baseline
  bon-1     best_of_n n=1, reward {type: embedding}
  bon-4     best_of_n n=4, reward {type: embedding}
then each round sends the same chat request to every policy in shuffled order
(temperature 0.9, fixed max_tokens, fixed seed per round). Prints median/p90 per
policy, ratios to default and bon-4 ÷ bon-1 (issue target ≤ 1.3×), and writes
benchmarks/results/best_of_n_e2e.json. Completion tokens are recorded too: a
sampled candidate may stop before max_tokens, so compare token counts as well.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guard.client import GuardClient  # noqa: E402
from benchmarks.harness import latency_row, start_guard, upstream_model  # noqa: E402
from guard.upstream.launcher import ManagedVLLM  # noqa: E402

QUESTION = "Name three things people often keep in a kitchen."
TEMPERATURE = 0.9
TARGET_RATIO = 1.3


def policies(max_tokens: int) -> dict[str, str]:
    def bon(n: int) -> str:
        return (
            f"name: bon-{n}\n"
            f"sampling: {{max_tokens: {max_tokens}}}\n"
            "steps:\n"
            "  - type: best_of_n\n"
            f"    n: {n}\n"
            f"    temperature: {TEMPERATURE}\n"
            "    reward: {type: embedding}\n"
        )

    return {
        "default.yaml": f"name: default\nsampling: {{max_tokens: {max_tokens}}}\n",
        "bon-1.yaml": bon(1),
        "bon-4.yaml": bon(4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="model for vLLM (default: the bundled Gemma 3 270M)")
    parser.add_argument("--max-model-len", type=int, default=1024, help="vLLM context length (at most the model's)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds; each round sends one request per policy")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per policy before the rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "best_of_n_e2e.json")
    args = parser.parse_args()

    model_dir, served, dtype = upstream_model(args.model_dir)

    workdir = Path(tempfile.mkdtemp(prefix="guard-bench-bon-"))
    policy_dir = workdir / "policies"
    policy_dir.mkdir()
    for name, text in policies(args.max_tokens).items():
        (policy_dir / name).write_text(text)

    names = ["default", "bon-1", "bon-4"]
    samples: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, list[int]] = {name: [] for name in names}
    started = time.perf_counter()
    with ManagedVLLM(model_dir, served_model_name=served, dtype=dtype, max_model_len=args.max_model_len, log_path=workdir / "vllm.log") as vllm:
        vllm_start = time.perf_counter() - started
        guard_started = time.perf_counter()
        guard_process, target = start_guard(vllm.url, served, policy_dir, workdir / "guard.log")
        guard_start = time.perf_counter() - guard_started
        try:
            guard = GuardClient(target)

            def call(policy: str, seed: int):
                return guard.generate(
                    [("user", QUESTION)], policy=policy, max_tokens=args.max_tokens,
                    temperature=TEMPERATURE, seed=seed, timeout=300,
                )

            for name in names:  # warm-up: connections, compiled shapes, the embedding model's first load
                for i in range(args.warmup):
                    call(name, 1000 + i)
            rng = random.Random(0)
            for round_index in range(args.rounds):
                order = list(names)
                rng.shuffle(order)  # interleaved: machine noise hits every policy alike
                for name in order:
                    t0 = time.perf_counter()
                    answer = call(name, round_index)
                    samples[name].append(time.perf_counter() - t0)
                    tokens[name].append(answer.completion_tokens)
                print(f"round {round_index + 1}/{args.rounds}: "
                      + ", ".join(f"{n} {samples[n][-1] * 1e3:.0f} ms" for n in names), flush=True)
            guard.close()
        finally:
            guard_process.terminate()
            guard_process.wait(30)

    base = statistics.median(samples["default"])
    results = {
        name: {**latency_row(values, base), "median_completion_tokens": statistics.median(tokens[name])}
        for name, values in samples.items()
    }
    ratio = statistics.median(samples["bon-4"]) / statistics.median(samples["bon-1"])
    # Per-round ratios pair requests that ran back to back: less sensitive to drift than a ratio of medians.
    paired = statistics.median(a / b for a, b in zip(samples["bon-4"], samples["bon-1"]))
    print(f"\nmodel {served} ({model_dir}), max_tokens {args.max_tokens}, {args.rounds} interleaved rounds")
    print(f"vLLM start {vllm_start:.1f}s, guard start {guard_start:.1f}s\n")
    print(f"{'policy':10} {'median ms':>10} {'p90 ms':>10} {'÷ default':>10} {'tokens':>7}")
    for name, row in results.items():
        print(f"{name:10} {row['median_ms']:10.1f} {row['p90_ms']:10.1f} {row['ratio_to_baseline']:10.3f} "
              f"{row['median_completion_tokens']:7.0f}")
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(f"\nbon-4 ÷ bon-1: {ratio:.3f} (median of per-round ratios {paired:.3f}); {verdict} the ≤ {TARGET_RATIO}× target")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "best_of_n_e2e",
                "model": served,
                "max_tokens": args.max_tokens,
                "temperature": TEMPERATURE,
                "rounds": args.rounds,
                "vllm_start_seconds": vllm_start,
                "guard_start_seconds": guard_start,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "results": results,
                "ratio_bon4_to_bon1": ratio,
                "paired_ratio_bon4_to_bon1": paired,
                "target_ratio": TARGET_RATIO,
                "meets_target": ratio <= TARGET_RATIO,
                "samples_seconds": samples,
                "completion_tokens": tokens,
            },
            indent=2,
        )
    )
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
